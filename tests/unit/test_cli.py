"""The command line as a user meets it, through the real CLI (`python -m
migrate.cli`, no TensorFlow import): help on each command, --version, wrong
command lines (one line, exit 2). Fast: no conversion runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import migrate
from migrate import options as options_lib
from tests.conftest import REPO


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "migrate.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=False)


CONVERSION_FLAGS = ["--signature", "--output_key", "--[no]overwrite",
                    "--[no]keep_output_dropout", "--[no]verify", "--[no]keep_failed",
                    "--format", "--[no]allow_unsafe_ops", "--timeout", "--memory_limit",
                    "--report", "--[no]verbose"]
HELP = {
    (): (["SRC", "DST", "verify OLD NEW", "batch SRC_ROOT DST_ROOT"], CONVERSION_FLAGS,
         ["--jobs", "--manifest", "--beam_args"]),
    ("verify",): (["OLD", "NEW"],
                  ["--[no]allow_unsafe_ops", "--timeout", "--memory_limit", "--report"],
                  ["--signature", "--[no]verify", "--jobs", "--format"]),
    ("batch",): (["SRC_ROOT", "DST_ROOT"],
                 CONVERSION_FLAGS + ["--jobs", "--manifest", "--beam_args"], []),
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "convert")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_each_command(command, flag):
  arguments, flags, absent = HELP[command]
  run = _cli(*command, flag)
  assert run.returncode == 0 and run.stderr == "", run.stderr
  text = run.stdout
  assert text.startswith(f"usage: migrate-hub-module {command[0] + ' ' if command else ''}"
                         "[flags]"), text
  for needle in arguments + flags + ["exit codes:", "2 usage", "143 terminated"]:
    assert needle in text, needle
  for needle in absent + ["--helpfull", "--logtostderr", "--verbosity"]:  # absl's.
    assert needle not in text, needle
  # Help anywhere on the line, as tools do.
  assert _cli(*command, "SRC", flag).stdout == text


def test_the_main_help_lists_the_commands_and_the_formats():
  text = _cli("--help").stdout
  assert "commands:" in text and "COMMAND --help" in text
  assert "{savedmodel,keras}" in text and set(options_lib.FORMATS) == {"savedmodel", "keras"}


def test_version():
  run = _cli("--version")
  assert (run.returncode, run.stdout.strip()) == (0, f"migrate-hub-module {migrate.__version__}")
  assert _cli("batch", "--version").stdout == run.stdout


@pytest.mark.parametrize("args, line", [
    (["--frobnicate", "a", "b"], "Unknown command line flag 'frobnicate'"),
    (["a", "b", "--frobnicate=3"], "Unknown command line flag 'frobnicate'"),
    (["verify", "a", "b", "--noverify"], "Unknown command line flag 'noverify'"),
    (["a", "b", "--jobs=2"], "Unknown command line flag 'jobs'"),
    (["a"], "expected SRC DST, found 1 argument(s)"),
    (["a", "b", "c"], "expected SRC DST, found 3 argument(s)"),
    (["verify", "a"], "verify takes OLD NEW, found 1 argument(s)"),
    (["batch"], "batch takes SRC_ROOT DST_ROOT, found 0 argument(s)"),
    (["a", "b", "--timeout=-1"], "--timeout: invalid non-negative number value: '-1'"),
    (["batch", "a", "b", "--jobs=0"], "--jobs: invalid positive integer value: '0'"),
    (["a", "b", "--format=onnx"], "--format: invalid choice: 'onnx'"),
    (["a", "b.keras", "--format=savedmodel"],
     "--format=savedmodel writes a directory: DST may not end in .keras, found b.keras"),
    (["a", "b", "--sig=x"], "Unknown command line flag 'sig'"),  # No abbreviations.
    # Checked before anything is read: SRC_ROOT 'a' does not exist.
    (["batch", "a", "b", "--report=r.json,r.txt"],
     "r.txt: expected a report file ending in .json, .csv or .html, found '.txt'"),
    (["batch", "a", "b", "--report=report"],
     "report: expected a report file ending in .json, .csv or .html, found no extension"),
])
def test_a_wrong_command_line_is_one_line_and_exit_2(args, line):
  run = _cli(*args)
  assert run.returncode == 2, run
  assert run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
  assert run.stderr.startswith("migrate-hub-module: error: ") and line in run.stderr, run.stderr
  assert run.stderr.rstrip().endswith("(see --help)")
