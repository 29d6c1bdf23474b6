"""The batch as an Apache Beam pipeline: migrate a whole registry on many machines.

    pip install 'migrate-hub-module[beam]'
    report = run_pipeline(sources, "/shared/new_models",
                          pipeline_args=["--runner=DirectRunner",
                                         "--direct_num_workers=2",
                                         "--direct_running_mode=multi_threading"])

Same semantics as `batch.run_batch`: the launcher hashes the sources and skips
the modules that DST_ROOT's state records as up to date; the pipeline converts
and verifies the rest, one module per element, each in its own worker process
(`isolation.run_isolated`, so a TensorFlow crash costs one element, not the
Beam worker); the launcher records the outcomes in the state file and returns
the `BatchReport`.

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
import time
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options

from migrate import batch


class ConvertModuleFn(beam.DoFn):
  """Converts and verifies one module per element (a dict of a `batch.Source`)."""

  def __init__(self, dst_root: str, options: batch.ConvertOptions,
               timeout: Optional[float], threads_per_worker: Optional[int],
               max_archive_bytes: int):
    super().__init__()
    self._dst_root = dst_root
    self._options = options
    self._timeout = timeout
    self._threads = threads_per_worker
    self._max_archive_bytes = max_archive_bytes
    self._runner: Optional[batch.BatchRunner] = None

  def setup(self):
    self._runner = batch.BatchRunner(
        self._dst_root, jobs=1, timeout=self._timeout, options=self._options,
        on_progress=None, quiet=True, threads_per_worker=self._threads,
        max_archive_bytes=self._max_archive_bytes)

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


def run_pipeline(sources: Sequence[batch.Source], dst_root: str, *,
                 options: Optional[batch.ConvertOptions] = None,
                 timeout: Optional[float] = None,
                 pipeline_args: Optional[Sequence[str]] = None,
                 threads_per_worker: Optional[int] = None,
                 max_archive_bytes: int = batch.MAX_ARCHIVE_BYTES) -> batch.BatchReport:
  """Runs the batch on a Beam runner (DirectRunner by default); -> BatchReport."""
  options = options or batch.ConvertOptions()
  sources = batch.output_destinations(sources, options.output_format)
  dst_root = os.path.abspath(dst_root)
  started_at = batch.now_iso()
  work_dir = os.path.join(dst_root, batch.WORK_DIRNAME)
  args = list(pipeline_args or ["--runner=DirectRunner"])
  pipeline_opts = beam_options.PipelineOptions(args)
  jobs = pipeline_opts.view_as(beam_options.DirectOptions).direct_num_workers or 1
  os.makedirs(work_dir, exist_ok=True)
  lock = batch.RunLock(dst_root)
  runner = batch.BatchRunner(dst_root, jobs=max(1, jobs), timeout=timeout,
                             options=options, on_progress=None, quiet=True,
                             threads_per_worker=threads_per_worker,
                             max_archive_bytes=max_archive_bytes)
  results_dir = tempfile.mkdtemp(prefix=f"beam-{os.getpid()}-", dir=work_dir)
  try:
    batch.clean_stale_files(dst_root, [s.destination for s in sources])
    outcomes, todo = runner.plan(sources)
    elements = [{"index": i, "source": dataclasses.asdict(source), "sha256": sha,
                 "size": size}  # For the default time limit.
                for i, source, sha, size in todo]
    if elements:
      fn = ConvertModuleFn(dst_root, options, timeout, threads_per_worker,
                           max_archive_bytes)
      with beam.Pipeline(options=pipeline_opts) as pipeline:
        build_pipeline(pipeline, elements, os.path.join(results_dir, "outcomes"), fn)
      by_index = {i: source for i, source, _, _ in todo}
      for path in sorted(glob.glob(os.path.join(results_dir, "outcomes*.jsonl"))):
        with open(path, encoding="utf-8") as f:
          for line in f:
            if not line.strip():
              continue
            data = json.loads(line)
            outcome = batch.ModuleOutcome(**data["outcome"])
            runner.record(by_index[data["index"]], outcome)
            outcomes[data["index"]] = outcome
      for i, source, sha, _ in todo:
        if i not in outcomes:  # Should not happen: Beam retries failed bundles.
          outcomes[i] = batch.ModuleOutcome(
              source=source.location, destination=source.destination,
              kind=source.kind, status=batch.STATUS_FAILED,
              exit_code=int(batch.errors.ExitCode.INTERNAL), source_sha256=sha,
              error=f"{source.location}: expected an outcome from the pipeline, "
              f"found none")
  finally:
    shutil.rmtree(results_dir, ignore_errors=True)
    batch.remove_empty_work_dir(dst_root)
    lock.release()
  return batch.BatchReport(
      dst_root=dst_root, jobs=max(1, jobs), started_at=started_at,
      seconds=time.monotonic() - runner.started,
      modules=[outcomes[i] for i in sorted(outcomes)],
      state_path=runner.state.path)
