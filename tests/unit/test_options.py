"""The one options object: which fields the resume fingerprint holds, how old
records match, and that the CLI's flags and the dataclass's fields agree."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from migrate import cli
from migrate import errors
from migrate import options as options_lib
from migrate.options import ConvertOptions
from tests.conftest import REPO

# Fields of the library API only (no flag): which Keras backends verify a
# `.keras` output (all installed, from the CLI), and the placement of the
# reference side (chosen by the module's size; a batch sets it).
API_ONLY = {"keras_backends", "parallel_verify"}


def _with_field(name: str, marked: bool):
  """ConvertOptions with one more field (default None), marked or not."""
  metadata = {"fingerprint": marked, "recorded_before": None}
  return dataclasses.make_dataclass(
      "Extended", [(name, object, dataclasses.field(default=None, metadata=metadata))],
      bases=(ConvertOptions,), frozen=True)


def test_the_fingerprint_holds_exactly_the_marked_fields():
  marked = {f.name for f in dataclasses.fields(ConvertOptions) if f.metadata["fingerprint"]}
  assert marked == {"signature", "output_key", "keep_output_dropout", "output_format",
                    "verify", "allow_unsafe_ops", "keras_backends", "consumers"}
  assert set(options_lib.fingerprint(ConvertOptions())) == marked
  for name in marked:  # Each changes it.
    field = next(f for f in dataclasses.fields(ConvertOptions) if f.name == name)
    other = {bool: lambda v: not v, str: lambda v: v + "x"}.get(
        type(field.default), lambda v: ("x",))(field.default)
    assert options_lib.fingerprint(ConvertOptions(**{name: other})) != \
        options_lib.fingerprint(ConvertOptions()), name
  for name in {"overwrite", "keep_failed", "timeout", "memory_limit", "parallel_verify"}:
    changed = ConvertOptions().replace(**{name: 1})
    assert options_lib.fingerprint(changed) == options_lib.fingerprint(ConvertOptions())


def test_a_new_marked_field_changes_the_fingerprint_an_unmarked_one_does_not():
  base = options_lib.fingerprint(ConvertOptions())
  assert options_lib.fingerprint(_with_field("new_choice", True)(new_choice="a")) == {
      **base, "new_choice": "a"}
  assert options_lib.fingerprint(_with_field("new_speedup", False)(new_speedup="a")) == base


def test_records_from_before_a_field_match_its_old_behaviour():
  recorded = options_lib.fingerprint(ConvertOptions())
  extended = _with_field("new_choice", True)
  assert options_lib.matches_fingerprint(extended(), recorded)
  assert not options_lib.matches_fingerprint(extended(new_choice="a"), recorded)
  # A batch state of the first version: five options, output_format only for
  # .keras outputs; its SavedModel records match today's default batch.
  old = {"signature": None, "output_key": None, "keep_output_dropout": False,
         "verify": True, "allow_unsafe_ops": False}
  batch_default = ConvertOptions(output_format=options_lib.FORMAT_SAVEDMODEL)
  assert options_lib.matches_fingerprint(batch_default, old)
  assert not options_lib.matches_fingerprint(
      batch_default.replace(output_format=options_lib.FORMAT_KERAS), old)
  assert options_lib.matches_fingerprint(
      batch_default.replace(output_format=options_lib.FORMAT_KERAS),
      {**old, "output_format": "keras"})
  assert not options_lib.matches_fingerprint(batch_default.replace(verify=False), old)
  # JSON round trip (the state file): tuples come back as lists.
  backends = ConvertOptions(keras_backends=["jax"])
  assert backends.keras_backends == ("jax",)
  assert options_lib.matches_fingerprint(backends, options_lib.fingerprint(backends))


def test_keywords_build_the_options_and_unknown_ones_are_refused():
  assert options_lib.build(None, verify=False) == ConvertOptions(verify=False)
  base = ConvertOptions(signature="s")
  assert options_lib.build(base, overwrite=True) == ConvertOptions(signature="s",
                                                                    overwrite=True)
  with pytest.raises(TypeError):
    options_lib.build(None, no_such_option=1)


def test_every_field_has_the_flag_of_its_name():
  flags = set().union(*(c.flag_fields() for c in cli.COMMANDS))
  fields = {f.name for f in dataclasses.fields(ConvertOptions)}
  assert fields - API_ONLY <= flags, sorted(fields - API_ONLY - flags)
  assert not API_ONLY & flags


def test_the_cli_builds_the_options_from_its_flags():
  parsed = cli.parse(["--signature=s", "batch", "a", "b", "--noverify",
                      "--overwrite=true", "--format", "keras", "--timeout=0"])
  assert parsed.command == "batch"
  assert parsed.paths == ["a", "b"]
  assert cli.convert_options(parsed) == ConvertOptions(
      signature="s", verify=False, overwrite=True, output_format="keras", timeout=0.0)
  parsed = cli.parse(["a", "--verify=false", "b"])
  assert parsed.command is None
  assert cli.convert_options(parsed) == ConvertOptions(verify=False)


def test_the_options_and_the_cli_import_no_tensorflow():
  code = ("import sys, migrate.options, migrate.cli, migrate.batch; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow'")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("field, value", [("timeout", float("inf")), ("timeout", -1.0),
                                          ("memory_limit", float("nan")),
                                          ("memory_limit", 1e30)])
def test_limits_must_be_finite_and_in_range(field, value):
  with pytest.raises(errors.UsageError, match=field):
    ConvertOptions(**{field: value})
