"""Integrity of the committed legacy fixture corpus (legacy_fixtures/).

Runs in the MAIN venv without TensorFlow: only json, hashlib and numpy. Checks that every manifest's
sha256s match the committed files, that every module has the TF1 Hub layout, and that every golden
npz has the keys its json promises (docs/CONTRACT.md, "Golden file format").
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "legacy_fixtures")
MANIFESTS = os.path.join(ROOT, "manifests")
NAMES = sorted(f[:-5] for f in os.listdir(MANIFESTS) if f.endswith(".json")) \
    if os.path.isdir(MANIFESTS) else []
# The corpus is committed to git: keep it small. (NASNet-A's two cells alone are 1.1 MB: 143
# variables, and a hub module's graphs spend ~6 KB on each.)
MAX_CORPUS_BYTES = 6 * 2**20


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root):
    out = []
    for dirpath, _, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files)
    return sorted(out)


def manifest_problems(root, name):
    """All mismatches between manifests/<name>.json and the files under `root`."""
    with open(os.path.join(root, "manifests", name + ".json")) as f:
        manifest = json.load(f)
    problems = []
    listed = manifest["files"]
    for rel, sha in sorted(listed.items()):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            problems.append("missing: " + rel)
        elif _sha256(path) != sha:
            problems.append("sha256 mismatch: " + rel)
    module_files = {os.path.relpath(p, root)
                    for p in _files_under(os.path.join(root, "modules", name))}
    for rel in sorted(module_files - set(listed)):
        problems.append("not in manifest: " + rel)
    for ext in ("npz", "json"):
        rel = "goldens/%s.%s" % (name, ext)
        if os.path.exists(os.path.join(root, rel)) and rel not in listed:
            problems.append("not in manifest: " + rel)
    return problems


def _golden(name):
    with open(os.path.join(ROOT, "goldens", name + ".json")) as f:
        meta = json.load(f)
    npz_path = os.path.join(ROOT, "goldens", name + ".npz")
    return meta, npz_path


def expected_keys(meta):
    """The npz keys docs/CONTRACT.md requires, given the golden json."""
    keys = {"regularization_loss"}
    for tag in meta["batches"]:
        keys.add("images/" + tag)
    for sig, info in meta["signatures"].items():
        for out in info["outputs"]:
            for tag in meta["batches"]:
                keys.add("infer/%s/%s/%s" % (sig, out, tag))
    for sig in meta["train_signatures"]:
        for out in meta["signatures"][sig]["outputs"]:
            keys.add("train/%s/%s" % (sig, out))
        for op in meta["random_ops"].get(sig, []):
            keys.add("train_random/%s/%s" % (sig, op))
    for sig, outs in meta["nodropout"].items():
        for out in outs:
            keys.add("train_nodropout/%s/%s" % (sig, out))
    if meta["train_signatures"]:
        for var in meta["non_trainable_variables"]:
            keys.add("moving_before/" + var)
            keys.add("moving_after/" + var)
    if meta["hparams"]:
        for var in meta["non_trainable_variables"]:
            keys.add("moving_after_hparams/" + var)
    if meta["grad_signature"]:
        keys.add("grad_probe")
        for var in meta["trainable_variables"]:
            keys.add("grad_norm/" + var)
            if meta.get("grad_norm_infer"):
                keys.add("grad_norm_infer/" + var)
    return keys


def test_corpus_present():
    assert NAMES, "no manifests under legacy_fixtures/manifests"
    for name in NAMES:
        assert os.path.isfile(os.path.join(ROOT, "goldens", name + ".json")), name


@pytest.mark.parametrize("name", NAMES)
def test_manifest_sha256_match(name):
    assert manifest_problems(ROOT, name) == []


@pytest.mark.parametrize("name", NAMES)
def test_manifest_metadata(name):
    with open(os.path.join(MANIFESTS, name + ".json")) as f:
        manifest = json.load(f)
    assert manifest["name"] == name
    for key in ("python", "tensorflow", "tensorflow_hub", "tf_slim", "numpy"):
        assert manifest["versions"][key], key
    assert manifest["versions"]["tensorflow_hub"] == "0.15.0"
    assert manifest["date_utc"].endswith("Z")
    assert "generate.py --only %s" % name in manifest["regenerate"]
    assert "goldens/%s.json" % name in manifest["files"]


def test_manifest_check_detects_changed_byte(tmp_path):
    """The sha check must be able to fail: flip one byte of a module copy."""
    name = next(n for n in NAMES if os.path.exists(os.path.join(ROOT, "goldens", n + ".npz")))
    for sub in ("modules/" + name, "manifests", "goldens"):
        shutil.copytree(os.path.join(ROOT, sub), tmp_path / sub)
    assert manifest_problems(str(tmp_path), name) == []
    victim = tmp_path / "modules" / name / "variables" / "variables.data-00000-of-00001"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert manifest_problems(str(tmp_path), name) == [
        "sha256 mismatch: modules/%s/variables/variables.data-00000-of-00001" % name]
    (tmp_path / "modules" / name / "extra.txt").write_text("x")
    assert "not in manifest: modules/%s/extra.txt" % name in manifest_problems(str(tmp_path), name)


@pytest.mark.parametrize("name", NAMES)
def test_module_layout(name):
    mdir = os.path.join(ROOT, "modules", name)
    for f in ("saved_model.pb", "tfhub_module.pb", "variables/variables.index"):
        assert os.path.isfile(os.path.join(mdir, f)), f
    assert any(p.startswith(os.path.join(mdir, "variables", "variables.data-"))
               for p in _files_under(mdir))
    meta, _ = _golden(name)
    for asset in meta.get("assets", []):
        assert os.path.isfile(os.path.join(mdir, "assets", asset)), asset


@pytest.mark.parametrize("name", NAMES)
def test_golden_json_fields(name):
    meta, _ = _golden(name)
    for key in ("name", "description", "case", "tags", "signatures", "train_signatures",
                "default_signature_aliases", "expected_image_size", "variable_input_size",
                "train_batch", "batches", "trainable_variables", "variables",
                "non_trainable_variables", "random_ops", "reference_variables", "hparams",
                "expect_refusal", "versions"):
        assert key in meta, key
    assert meta["name"] == name
    assert sorted(meta["trainable_variables"] + meta["non_trainable_variables"]) == \
        sorted(meta["variables"])
    if ["train"] in meta["tags"]:
        assert meta["train_signatures"], "train tag without train signatures"
    else:
        assert meta["train_signatures"] == []
    alias = meta["default_signature_aliases"]
    if alias is not None:
        assert meta["signatures"][alias] == meta["signatures"]["default"]


@pytest.mark.parametrize("name", NAMES)
def test_golden_npz_keys(name):
    meta, npz_path = _golden(name)
    if meta["expect_refusal"]:
        assert isinstance(meta["expect_refusal"], str) and meta["expect_refusal"]
        if not os.path.exists(npz_path):
            return
    with np.load(npz_path, allow_pickle=False) as z:
        keys = set(z.files)
        missing = expected_keys(meta) - keys
        assert not missing, sorted(missing)[:20]
        for tag in meta["batches"]:
            img = z["images/" + tag]
            b, hw = tag[1:].split("_")
            h, w = (int(x) for x in hw.split("x"))
            assert img.shape == (int(b), h, w, 3) and img.dtype == np.float32
            assert 0.0 <= img.min() and img.max() <= 1.0
            for sig, info in meta["signatures"].items():
                for out, spec in info["outputs"].items():
                    arr = z["infer/%s/%s/%s" % (sig, out, tag)]
                    assert arr.shape[0] == int(b)
                    assert arr.ndim == len(spec["shape"])
                    assert np.all(np.isfinite(arr))
        assert z["regularization_loss"].shape == ()
        for key in keys:
            if not key.startswith("train_random/"):
                assert z[key].dtype == np.float32, key


@pytest.mark.parametrize("name", NAMES)
def test_golden_semantics(name):
    """Cheap sanity: the goldens really exercise train vs inference behaviour."""
    meta, npz_path = _golden(name)
    if not os.path.exists(npz_path):
        return
    with np.load(npz_path) as z:
        has_bn = any(v.endswith("moving_mean") for v in meta["non_trainable_variables"])
        if meta["train_signatures"] and meta["non_trainable_variables"]:
            changed = [v for v in meta["non_trainable_variables"]
                       if not np.array_equal(z["moving_before/" + v], z["moving_after/" + v])]
            assert changed, "no moving average changed after one training step"
            tag = meta["train_batch"]
            diffs = [np.max(np.abs(z["train/%s/%s" % (s, o)] - z["infer/%s/%s/%s" % (s, o, tag)]))
                     for s in meta["train_signatures"] for o in meta["signatures"][s]["outputs"]]
            if has_bn:  # batch statistics vs moving statistics
                assert max(diffs) > 1e-3, "train and inference outputs are identical"
        if meta["hparams"]:
            assert any(not np.array_equal(z["moving_after/" + v], z["moving_after_hparams/" + v])
                       for v in meta["non_trainable_variables"])
        if meta["grad_signature"]:
            norms = [float(z["grad_norm/" + v]) for v in meta["trainable_variables"]]
            assert all(np.isfinite(norms)) and max(norms) > 0


@pytest.mark.parametrize("name", [n for n in NAMES if _golden(n)[0].get("unseeded_random_ops")])
def test_unseeded_random_ops_were_fed_seeded_draws(name):
    """Their fed values are recorded, are uniform draws, and really drop something."""
    meta, npz_path = _golden(name)
    with np.load(npz_path) as z:
        for sig, ops in meta["unseeded_random_ops"].items():
            assert set(ops) <= set(meta["random_ops"][sig])
            for op in ops:
                value = z["train_random/%s/%s" % (sig, op)]
                assert value.dtype == np.float32 and 0.0 <= value.min() and value.max() < 1.0
        # Drop path / drop connect draws a [batch, 1, 1, 1] noise per op.
        per_example = [z["train_random/default/" + op] for op in meta["unseeded_random_ops"]["default"]]
        assert per_example and all(v.shape == (4, 1, 1, 1) for v in per_example)


@pytest.mark.parametrize("name", [n for n in NAMES if _golden(n)[0].get("grad_source")])
def test_analytic_gradients_say_why(name):
    meta, _ = _golden(name)
    assert meta["grad_source"].startswith("analytic: hub.Module cannot differentiate")
    assert "No gradient defined for operation" in meta["grad_source"]
    assert meta["grad_forward_max_abs_diff"] <= 1e-5


def test_corpus_size():
    total = sum(os.path.getsize(p) for sub in ("modules", "goldens", "manifests")
                for p in _files_under(os.path.join(ROOT, sub)))
    assert total < MAX_CORPUS_BYTES, "corpus is %.2f MB" % (total / 2**20)
