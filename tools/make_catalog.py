#!/usr/bin/env python3
"""A stand-in for the tfhub.dev TF1 image catalog: one TF1 Hub module per CSV row.

Runs in the LEGACY venv (TF 2.15 + tensorflow-hub 0.15 + tf-slim), like
legacy_fixtures/generate.py, whose exporter it uses (`hub.create_module_spec` +
`hub.Module(spec).export`):

    .legacy-venv/bin/python tools/make_catalog.py OUT [--limit=N] [--jobs=2]

For each row of ../shared/data/tfhub-tf1-image-modules.csv it writes
`OUT/<publisher>/<model...>/<version>.tar.gz`, packed as tfhub.dev served modules
(the module's files at the archive's root), with that row's task, signatures,
default image size, number of classes or features, variable-input-size flag
and fine-tunability (a `{"train"}` graph or not). The architecture is a small
member of the row's family, built from the committed fixtures' builders
(legacy_fixtures/fixture_nets.py, tf_slim.nets), then projected to the row's
documented output width where the small body's own width differs.

A seeded fraction of rows (`--bad_fraction`, 4% by default) is made bad the
way old archives go bad: a truncated variables file, a text module in place of
the image module, a missing variables index, a truncated archive. OUT/catalog.json
lists every module with its family, what was made and, for bad ones, how it
is expected to fail, so a rehearsal can check each outcome.
"""
import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(REPO, "legacy_fixtures")
# The catalog CSV lives in the team's shared data, beside the checkout (or
# beside the directory holding a worktree).
_CSV_NAME = os.path.join("shared", "data", "tfhub-tf1-image-modules.csv")
DEFAULT_CSV = next((p for p in (os.path.join(os.path.dirname(REPO), _CSV_NAME),
                                os.path.join(os.path.dirname(os.path.dirname(REPO)), _CSV_NAME))
                    if os.path.exists(p)), os.path.join(os.path.dirname(REPO), _CSV_NAME))
sys.path.insert(0, FIXTURES)

# What a bad row is made into, and the exit code the tool must answer with.
BAD_KINDS = {
    "truncated_variables": 6,   # variables.data-* cut in half
    "missing_index": 6,         # variables/variables.index removed
    "text_module": 5,           # a text embedding module under an image handle
    "truncated_archive": 6,     # the .tar.gz itself cut short
}
FAMILY_WIDTH = {  # The documented feature width when the row does not say.
    "mobilenet_v1": 1024, "mobilenet_v2": 1280, "resnet": 2048, "inception": 2048,
    "inception_resnet": 1536, "efficientnet": 1280, "nasnet": 1056, "quantops": 1024,
    "convnet": 256,
}


@dataclasses.dataclass
class Row:
    handle: str
    task: str
    family: str
    fine_tunable: bool
    image_size: tuple
    variable: bool
    signatures: list
    num_classes: int
    num_features: int
    bad: str = ""

    @property
    def archive(self):
        return _safe_path(self.handle) + ".tar.gz"

    @property
    def classification(self):
        return self.task == "image-classification"


def _safe_path(handle):
    return "/".join(re.sub(r"[^A-Za-z0-9_.&;-]", "_", part) for part in handle.split("/"))


def family_of(architecture, handle):
    """The builder family of a CSV row (architecture column, else the handle)."""
    text = (architecture or handle).lower()
    if "quantops" in handle:
        return "quantops"
    for key, family in (("mobilenet-v1", "mobilenet_v1"), ("mobilenet_v1", "mobilenet_v1"),
                        ("mobilenet-v2", "mobilenet_v2"), ("mobilenet_v2", "mobilenet_v2"),
                        ("inception-resnet", "inception_resnet"),
                        ("inception_resnet", "inception_resnet"),
                        ("inception", "inception"), ("resnet", "resnet"),
                        ("efficientnet", "efficientnet"), ("nasnet", "nasnet"),
                        ("amoebanet", "nasnet")):
        if key in text:
            return family
    return "convnet"


def read_rows(csv_path, limit=None, bad_fraction=0.04, seed=0):
    with open(csv_path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        size = r["image_size"]
        hw = tuple(int(v) for v in size.split("x")) if size else (224, 224)
        sigs = [s for s in r["signatures"].split(";") if s]
        family = family_of(r["architecture"], r["handle"])
        classification = r["task"] == "image-classification"
        if not sigs:
            sigs = ["image_classification"] if classification else ["image_feature_vector"]
        rows.append(Row(
            handle=r["handle"], task=r["task"], family=family,
            fine_tunable=r["fine_tunable"] == "true", image_size=hw,
            variable=r["variable_input_size"] == "True", signatures=sigs,
            num_classes=int(r["num_classes"] or 1001) if classification else 0,
            num_features=int(r["num_features"] or FAMILY_WIDTH[family])))
    if limit:
        # A spread over the catalog, not its first N rows: every family shows up.
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    rng = random.Random(seed)
    n_bad = max(1, round(bad_fraction * len(rows))) if bad_fraction > 0 else 0
    kinds = sorted(BAD_KINDS)
    for i, idx in enumerate(sorted(rng.sample(range(len(rows)), n_bad))):
        rows[idx].bad = kinds[i % len(kinds)]
    return rows


# ----------------------------------------------------------------------------------------------
# Building one module (legacy venv)
# ----------------------------------------------------------------------------------------------
def _body(row, images, is_training, momentum):
    """(pooled features [batch, c], logits-ready tensor) of a small family member."""
    import tensorflow as tf  # noqa
    import tf_slim as slim
    import fixture_nets
    from tf_slim.nets import resnet_v2
    tf1 = tf.compat.v1
    decay = momentum if momentum is not None else 0.997
    fam = row.family
    if fam == "mobilenet_v1":
        _, features, _ = fixture_nets.mobilenet_v1(
            images, 10, is_training, batch_norm_decay=decay,
            conv_defs=[(1, 16), (2, 24), (2, 32)], global_pool=row.variable)
    elif fam == "mobilenet_v2":
        _, features, _ = fixture_nets.mobilenet_v2(
            images, 10, is_training, depth_multiplier=0.35, batch_norm_decay=decay,
            block_defs=[(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 1, 2)])
    elif fam == "quantops":
        _, features, _ = fixture_nets.mobilenet_quant(images, 10, is_training)
    elif fam == "resnet":
        blocks = [resnet_v2.resnet_v2_block("block1", base_depth=4, num_units=1, stride=2),
                  resnet_v2.resnet_v2_block("block2", base_depth=8, num_units=1, stride=1)]
        with slim.arg_scope(resnet_v2.resnet_arg_scope(weight_decay=1e-4,
                                                       batch_norm_decay=decay)):
            net, _ = resnet_v2.resnet_v2(images, blocks, num_classes=None,
                                         is_training=is_training, global_pool=True,
                                         include_root_block=True, scope="resnet_v2")
        features = tf.squeeze(net, [1, 2], name="pooled")
    elif fam in ("inception", "inception_resnet"):
        # slim's own inception_v2 base, cut early, with a global mean pool (any input size).
        from tf_slim.nets import inception_v2
        with slim.arg_scope(inception_v2.inception_v2_arg_scope(weight_decay=4e-5)), \
                slim.arg_scope([slim.batch_norm], is_training=is_training, decay=decay):
            net, _ = inception_v2.inception_v2_base(
                images, final_endpoint="Mixed_3b", min_depth=4, depth_multiplier=0.1,
                scope="InceptionV2")
        features = tf.reduce_mean(net, [1, 2], name="pooled")
    elif fam == "efficientnet":
        # Drop connect and dropout from unseeded random ops, and swish as TF 1.x built it (a
        # Defun with a library gradient), as the TF1 EfficientNet modules were exported.
        _, features = fixture_nets.efficientnet(
            images, 10, is_training, blocks=[(3, 1, 2, 1, 8, 16, 0.25), (5, 1, 1, 6, 16, 16, 0.25)],
            stem_filters=8, head_filters=32, dropout_rate=0.2, survival_prob=0.8,
            swish="defun", scope="efficientnet-tiny")
    elif fam == "nasnet":
        # One reduction and one normal NASNet-A cell with drop path (unseeded RandomUniform).
        with fixture_nets.nasnet_arg_scope(is_training, weight_decay=4e-5,
                                           batch_norm_decay=decay):
            _, features = fixture_nets.nasnet_a(
                images, 10, is_training, num_cells=1, num_conv_filters=8,
                num_reduction_layers=1, drop_path_keep_prob=0.7, stem="cifar")
    else:  # convnet
        _, features = fixture_nets.small_convnet(images, 10, is_training, depths=(8, 16),
                                                 batch_norm_decay=decay)
    return features


def _build(row, is_training):
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_slim as slim
    import generate
    tf1 = tf.compat.v1
    shape = [None, None, None, 3] if row.variable else [None, *row.image_size, 3]
    images = tf1.placeholder(tf.float32, shape, name="images")
    hparams = any(s.endswith("_with_bn_hparams") for s in row.signatures)
    momentum = (tf1.placeholder_with_default(tf.constant(0.99, tf.float32), [],
                                             name="batch_norm_momentum")
                if hparams else None)
    features = _body(row, images, is_training, momentum)
    width = features.get_shape().as_list()[-1]
    if width != row.num_features:
        with tf1.variable_scope("Projection"):
            features = slim.fully_connected(
                features, row.num_features, activation_fn=tf.nn.relu,
                weights_regularizer=slim.l2_regularizer(4e-5), scope="fc")
    features = tf.identity(features, name="feature_vector")
    outputs = {"image_feature_vector": features}
    if row.classification or "image_classification" in row.signatures:
        with tf1.variable_scope("Logits"):
            net = slim.dropout(features, keep_prob=0.8, is_training=is_training,
                               scope="Dropout")
            logits = slim.fully_connected(
                net, row.num_classes or 1001, activation_fn=None,
                weights_regularizer=slim.l2_regularizer(4e-5), scope="Conv2d_1c_1x1")
        outputs["image_classification"] = logits
    default = outputs["image_classification" if row.classification else "image_feature_vector"]
    hub.add_signature("default", {"images": images}, {"default": default})
    for sig in row.signatures:
        base = sig.replace("_with_bn_hparams", "")
        if base not in outputs:
            continue
        inputs = {"images": images}
        if sig.endswith("_with_bn_hparams"):
            inputs["batch_norm_momentum"] = momentum
        hub.add_signature(sig, inputs, {"default": outputs[base]})
    info = hub.ImageModuleInfo()
    info.default_image_size.height, info.default_image_size.width = row.image_size
    hub.attach_image_module_info(info)
    del generate  # (imported for its shims and exporter)


def _export(row, path):
    import generate
    tags = generate.TRAIN_TAGS if row.fine_tunable else generate.INFER_TAGS
    case = generate.Case(_safe_path(row.handle), row.handle, "catalog", None,
                         tags_and_args=list(tags), image_size=row.image_size,
                         variable_input_size=row.variable)
    if row.bad == "text_module":
        text_case = generate.CASES["text_module"]
        generate.export_module(dataclasses.replace(text_case, name=case.name), path)
    else:
        generate.export_module(case, path, build=functools.partial(_build, row))


def _spoil(row, path):
    """Makes the module bad the way `row.bad` says (after a good export)."""
    variables = os.path.join(path, "variables")
    if row.bad == "truncated_variables":
        for name in sorted(os.listdir(variables)):
            if name.startswith("variables.data"):
                full = os.path.join(variables, name)
                with open(full, "r+b") as f:
                    f.truncate(os.path.getsize(full) // 2)
    elif row.bad == "missing_index":
        os.remove(os.path.join(variables, "variables.index"))


def _pack(src_dir, archive):
    """A tfhub.dev-style archive: the module's files at the root, fixed metadata."""
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    tmp = archive + ".tmp"
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for root, dirs, files in os.walk(src_dir):
                dirs.sort()
                for name in sorted(dirs) + sorted(files):
                    full = os.path.join(root, name)
                    info = tar.gettarinfo(full, os.path.relpath(full, src_dir))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    if info.isfile():
                        with open(full, "rb") as f:
                            tar.addfile(info, f)
                    elif name in dirs:
                        tar.addfile(info)
    os.replace(tmp, archive)


def make_one(args):
    """Builds, spoils (if bad) and packs one row; returns its catalog entry."""
    row, out = args
    start = time.monotonic()
    archive = os.path.join(out, row.archive)
    done = _entry_path(out, row)
    if os.path.exists(archive):  # a rerun resumes (archives are renamed in whole)
        if os.path.exists(done):
            with open(done, encoding="utf-8") as f:
                return json.load(f)
        entry = dataclasses.asdict(row)  # made by a run that kept no entry
        entry.update(archive=row.archive, bytes=os.path.getsize(archive),
                     expect_exit_code=BAD_KINDS.get(row.bad, 0), seconds=None)
        return entry
    work = tempfile.mkdtemp(prefix="catalog_")
    try:
        module = os.path.join(work, "module")
        _export(row, module)
        _spoil(row, module)
        _pack(module, archive)
        if row.bad == "truncated_archive":
            with open(archive, "r+b") as f:
                f.truncate(os.path.getsize(archive) * 2 // 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entry = dataclasses.asdict(row)
    entry.update(archive=row.archive, bytes=os.path.getsize(archive),
                 expect_exit_code=BAD_KINDS.get(row.bad, 0),
                 seconds=round(time.monotonic() - start, 2))
    os.makedirs(os.path.dirname(done), exist_ok=True)
    with open(done + ".tmp", "w", encoding="utf-8") as f:
        json.dump(entry, f)
    os.replace(done + ".tmp", done)
    return entry


def _entry_path(out, row):
    """Where a made row's entry waits for catalog.json (so a rerun resumes)."""
    key = hashlib.sha256(repr(dataclasses.astuple(row)).encode()).hexdigest()[:16]
    return os.path.join(out, ".made", key + ".json")


def _worker_init():
    import logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import _legacy_shims  # noqa: F401  (before tf_slim)
    import tensorflow as tf
    tf.get_logger().setLevel(logging.ERROR)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="catalog root to write (archives and catalog.json)")
    p.add_argument("--csv", default=DEFAULT_CSV)
    p.add_argument("--limit", type=int, default=0, help="only N rows, spread over the CSV")
    p.add_argument("--bad_fraction", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    rows = read_rows(args.csv, args.limit or None, args.bad_fraction, args.seed)
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    work = [(r, args.out) for r in rows]
    ctx = multiprocessing.get_context("spawn")
    entries = []
    with ctx.Pool(args.jobs, initializer=_worker_init, maxtasksperchild=25) as pool:
        for i, entry in enumerate(pool.imap(make_one, work), 1):
            entries.append(entry)
            if i % 25 == 0 or i == len(work):
                print("%d/%d modules, %.0f s" % (i, len(work), time.monotonic() - start),
                      flush=True)
    catalog = {"csv": os.path.abspath(args.csv),
               "csv_sha256": hashlib.sha256(open(args.csv, "rb").read()).hexdigest(),
               "seed": args.seed, "bad_fraction": args.bad_fraction,
               "modules": entries}
    with open(os.path.join(args.out, "catalog.json"), "w", encoding="utf-8") as f:
        json.dump(catalog, f, indent=1)
    print("catalog: %d modules (%d bad) in %s, %.0f s" % (
        len(entries), sum(1 for e in entries if e["bad"]), args.out,
        time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
