#!/usr/bin/env bash
# Build the LEGACY venv used by legacy_fixtures/generate.py (TF1 Hub module exporter + hub.Module goldens).
#
#   bash legacy_fixtures/setup_legacy_env.sh            # -> <repo>/.legacy-venv
#   LEGACY_VENV=/some/path bash legacy_fixtures/setup_legacy_env.sh
#
# Idempotent: re-running on a complete venv only checks the pinned versions.
# Needs python3.11 on PATH (TF 2.15 has no wheels for 3.12+) and access to PyPI.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LEGACY_VENV:-$REPO_ROOT/.legacy-venv}"
PYTHON="${PYTHON:-python3.11}"

# Pinned versions: the goldens in legacy_fixtures/goldens were recorded with exactly these.
PINS=(
  "tensorflow-cpu==2.15.1"
  "tensorflow-hub==0.15.0"
  "tf-slim==1.1.0"
  "tf-keras==2.15.1"
  "numpy==1.26.4"
)

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found on PATH (TF 2.15 needs python 3.9-3.11)" >&2
  exit 1
fi

check() {
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, sys
want = {"tensorflow-cpu": "2.15.1", "tensorflow-hub": "0.15.0", "tf-slim": "1.1.0",
        "tf-keras": "2.15.1", "numpy": "1.26.4"}
bad = []
for name, ver in want.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != ver:
        bad.append(f"{name}: have {have}, want {ver}")
if sys.version_info[:2] != (3, 11):
    bad.append(f"python {sys.version.split()[0]}, want 3.11")
if bad:
    print("\n".join(bad)); sys.exit(1)
PY
}

if [ -x "$VENV/bin/python" ] && check >/dev/null 2>&1; then
  echo "legacy venv OK: $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip<25" "setuptools<70" wheel
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
check
echo "legacy venv ready: $VENV"
