"""Running a Beam job from this machine: options, the runner's kind, counters, the run itself.

Both jobs' `run_job` call `run_pipeline` with a function that builds their graph; it
prints progress while the pipeline runs and returns the result and the seconds taken.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.progress import ProgressReporter
from model.quiet import filtered_stream

LOG = logging.getLogger("show_attend_tell")


def _not_beam_resource_notice(record: logging.LogRecord) -> bool:
    # Beam 2.77's RunInference imports `resource` together with a module that needs
    # torch; without torch it warns twice per run that memory cannot be measured.
    return not record.getMessage().startswith("Resource module is not available")


def _not_disk_full_traceback(record: logging.LogRecord) -> bool:
    # A worker that fills the disk fails the job, which the launcher then reports in one
    # line that says how to resume (caption_run.disk_full_message); Beam's own log of the
    # worker's traceback would come first.
    return "No space left on device" not in record.getMessage()


# Runners that run the pipeline in this machine's memory: a shuffle there holds its data.
LOCAL_RUNNERS = (
    "DirectRunner",
    "FnApiRunner",
    "PrismRunner",
    "BundleBasedDirectRunner",
    "SwitchingDirectRunner",
)


def runs_remotely(options: PipelineOptions) -> bool:
    """Whether the workers are other machines (Dataflow, ...), not this one's processes."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return (name or "DirectRunner") not in LOCAL_RUNNERS


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam flags pass straight through. With no --runner we use the in-process
    FnApiRunner: DirectRunner would first try to download Prism, which fails offline."""
    root = logging.getLogger()
    if _not_beam_resource_notice not in root.filters:
        root.addFilter(_not_beam_resource_notice)
    worker_errors = logging.getLogger("apache_beam.runners.common")  # where Beam logs them
    if _not_disk_full_traceback not in worker_errors.filters:
        worker_errors.addFilter(_not_disk_full_traceback)
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "FnApiRunner"
    return options


def dry_run_result(result: Any, options: PipelineOptions, job: str) -> dict[str, Any] | None:
    """With --dry_run (Dataflow), say that the pipeline was only translated."""
    from apache_beam.options.pipeline_options import TestOptions

    if not options.view_as(TestOptions).dry_run:
        return None
    print(f"{job}: dry run: pipeline translated for the runner; nothing was submitted or run")
    return {"dry_run": True}


def counter_values(result: Any, namespace: str) -> dict[str, int]:
    """Committed counter totals of a finished pipeline (attempted where committed is absent)."""
    values: dict[str, int] = {}
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not report metrics
        return values
    for c in counters:
        if c.key.metric.namespace != namespace:
            continue
        value = c.committed if c.committed is not None else c.attempted
        values[c.key.metric.name] = values.get(c.key.metric.name, 0) + int(value or 0)
    return values


def run_pipeline(
    options: PipelineOptions,
    build: Callable[[beam.Pipeline, str], None],
    reporter: ProgressReporter,
    verbose: bool = False,
) -> tuple[Any, float]:
    """Builds a pipeline with `build(pipeline, progress_dir)` and runs it to the end while
    `reporter` prints progress; returns (result, seconds). Unless `verbose`, the start-up
    lines of worker processes (multi_processing) are filtered out like the launcher's."""
    quiet = contextlib.nullcontext() if verbose else filtered_stream()
    with quiet, Timer() as timer, reporter:
        p = beam.Pipeline(options=options)
        build(p, reporter.dir)
        result = p.run()
        reporter.attach(result)  # runners whose run() returns at once report counters
        result.wait_until_finish()
    return result, timer.seconds


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
