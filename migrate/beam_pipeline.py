"""The batch as an Apache Beam pipeline: migrate a whole registry on many machines.

    pip install 'migrate-hub-module[beam]'
    report = run_pipeline(sources, "/shared/new_models",
                          pipeline_args=["--runner=DirectRunner",
                                         "--direct_num_workers=2",
                                         "--direct_running_mode=multi_threading"])

The batch's own skeleton (`batch.BatchRunner.run`: the launcher hashes the
sources, skips the modules that DST_ROOT's state records as up to date,
records the outcomes and returns the `BatchReport`) with another executor,
`BeamExecutor`: the pipeline converts and verifies the rest, one module per
element, each in its own worker process (`isolation.run_isolated`, so a
TensorFlow crash costs one element, not the Beam worker).

On a distributed runner (Dataflow, Flink, Spark) DST_ROOT and local sources
must be a file system that every worker mounts at the same path (the
converter writes with `os`, not `gs://`); URL sources are fetched by the
workers. Outcomes travel as JSON lines through
`DST_ROOT/.migrate-batch/beam-*`; modules that finished before a pipeline
failure are not recorded, and the next run converts them again (their DST is
recognised by its model card and replaced atomically).

apache-beam 2.77 requires protobuf < 7 (TensorFlow 2.21 accepts >= 6.31.1,
< 8): installing the `[beam]` extra puts protobuf 6.33.x in the environment.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options

from migrate import batch
from migrate import options as options_lib


class ConvertModuleFn(beam.DoFn):
  """Converts and verifies one module per element (a dict of a `batch.Source`)."""

  def __init__(self, dst_root: str, options: options_lib.ConvertOptions,
               threads_per_worker: Optional[int], max_archive_bytes: int,
               memory_limit: Optional[int]):
    super().__init__()
    self._dst_root = dst_root
    self._options = options
    self._threads = threads_per_worker
    self._max_archive_bytes = max_archive_bytes
    self._memory_limit = memory_limit
    self._runner: Optional[batch.BatchRunner] = None

  def setup(self):
    self._runner = batch.BatchRunner(
        self._dst_root, self._options, jobs=1, quiet=True,
        threads_per_worker=self._threads,
        max_archive_bytes=self._max_archive_bytes,
        memory_limit=self._memory_limit)

  def process(self, element: dict[str, Any]):
    source = batch.Source(**element["source"])
    outcome = self._runner.convert(source, element["sha256"],
                                   element.get("size", 0))
    yield json.dumps({"index": element["index"],
                      "outcome": dataclasses.asdict(outcome)})


def build_pipeline(pipeline: beam.Pipeline, elements: Sequence[dict[str, Any]],
                   results_prefix: str, fn: ConvertModuleFn) -> None:
  """Create -> Reshuffle (spread the modules over workers) -> convert -> JSON lines."""
  _ = (pipeline
       | "Modules" >> beam.Create(list(elements))
       | "Spread" >> beam.Reshuffle()
       | "ConvertAndVerify" >> beam.ParDo(fn)
       | "Outcomes" >> beam.io.WriteToText(results_prefix,
                                           file_name_suffix=".jsonl"))


class BeamExecutor:
  """Executes a batch's work items as a Beam pipeline (`batch.Executor`);
  the outcomes come back as JSON lines through `DST_ROOT/.migrate-batch/beam-*`."""

  def __init__(self, pipeline_options: beam_options.PipelineOptions):
    self.pipeline_options = pipeline_options

  def execute(self, runner: batch.BatchRunner, todo: Sequence[batch.Todo]
              ) -> dict[int, batch.ModuleOutcome]:
    os.makedirs(runner.work_dir, exist_ok=True)
    results_dir = tempfile.mkdtemp(prefix=f"beam-{os.getpid()}-",
                                   dir=runner.work_dir)
    try:
      elements = [{"index": i, "source": dataclasses.asdict(source),
                   "sha256": sha, "size": size}  # For the default time limit.
                  for i, source, sha, size in todo]
      fn = ConvertModuleFn(runner.dst_root, runner.options, runner.threads,
                           runner.max_archive_bytes, runner.memory_limit)
      with beam.Pipeline(options=self.pipeline_options) as pipeline:
        build_pipeline(pipeline, elements, os.path.join(results_dir, "outcomes"),
                       fn)
      by_index = {i: source for i, source, _, _ in todo}
      outcomes = {}
      for path in sorted(glob.glob(os.path.join(results_dir, "outcomes*.jsonl"))):
        with open(path, encoding="utf-8") as f:
          for line in f:
            if not line.strip():
              continue
            data = json.loads(line)
            outcome = batch.ModuleOutcome(**data["outcome"])
            runner.record(by_index[data["index"]], outcome)
            outcomes[data["index"]] = outcome
      return outcomes
    finally:
      shutil.rmtree(results_dir, ignore_errors=True)

  def missing(self, source: batch.Source) -> str:
    # Should not happen: Beam retries failed bundles.
    return (f"{source.location}: expected an outcome from the pipeline, found "
            f"none")


def run_pipeline(sources: Sequence[batch.Source], dst_root: str,
                 options: Optional[options_lib.ConvertOptions] = None, *,
                 pipeline_args: Optional[Sequence[str]] = None,
                 threads_per_worker: Optional[int] = None,
                 max_archive_bytes: int = batch.MAX_ARCHIVE_BYTES,
                 **keywords: Any) -> batch.BatchReport:
  """Runs the batch on a Beam runner (DirectRunner by default); -> BatchReport.

  `options` and `keywords` as for `batch.run_batch`. A memory limit applies
  only if `options.memory_limit` is given: the launcher does not know the
  workers' machines.
  """
  options = options_lib.build(options, **keywords)
  pipeline_options = beam_options.PipelineOptions(
      list(pipeline_args or ["--runner=DirectRunner"]))
  jobs = max(1, pipeline_options.view_as(
      beam_options.DirectOptions).direct_num_workers or 1)
  runner = batch.BatchRunner(
      dst_root, options, jobs=jobs, quiet=True,
      threads_per_worker=threads_per_worker,
      max_archive_bytes=max_archive_bytes,
      memory_limit=(None if options.memory_limit is None
                    else options.memory_limit_bytes(jobs)))
  return runner.run(sources, BeamExecutor(pipeline_options))
