"""What both Beam jobs share: options, file reads, the preprocessing DoFn, error rows, counters."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.utils.windowed_value import WindowedValue

from beam_jobs.progress import ERROR_PREFIX, ProgressReporter, Tally
from beam_jobs.sources import check_plain_file, read_failure, read_file
from model.cli import UsageError  # noqa: F401 - re-exported for the jobs
from model.defaults import MAX_BYTES, MAX_PIXELS, PENDING_BYTES
from model.images.preprocess import ImageError, PreprocessedImage, preprocess_image
from model.quiet import filtered_stream

ERRORS_TAG = "errors"
LOG = logging.getLogger("show_attend_tell")


def _not_beam_resource_notice(record: logging.LogRecord) -> bool:
    # Beam 2.77's RunInference imports `resource` together with a module that needs
    # torch; without torch it warns twice per run that memory cannot be measured.
    return not record.getMessage().startswith("Resource module is not available")


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


def error_row(uri: str, kind: str, message: str) -> dict[str, str]:
    """A row of the errors table (model.io.formats.ERRORS_SCHEMA)."""
    return {"uri": uri, "error_type": kind, "message": message[:2000]}


@dataclass(frozen=True)
class Loaded:
    """An input for PreprocessFn: its bytes, or None to have them read from `uri`.

    `key` is whatever the job carries through (a record or a uri).
    """

    key: Any
    uri: str
    data: bytes | None = None


class Meta(NamedTuple):
    """What travels beside the pixels through RunInference (a KeyedModelHandler key)."""

    key: Any
    width: int
    height: int
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class Outcome:
    """One input after reading and decoding: pixels, or the error that stopped it."""

    decoded: PreprocessedImage | None
    error: ImageError | None
    nbytes: int = 0  # 0 when the file could not be read
    sha256: str = ""


def load_and_decode(item: Loaded, max_pixels: int, max_bytes: int = MAX_BYTES) -> Outcome:
    """Reads (if needed) and preprocesses one input; never raises for a bad input."""
    data = item.data
    if data is None:
        try:
            check_plain_file(item.uri, max_bytes)
            data = read_file(item.uri)
        except ImageError as e:  # not a regular file, or too large: refused unread
            return Outcome(None, e)
        except Exception as e:  # noqa: BLE001 - any IO failure becomes an error row
            return Outcome(None, read_failure(item.uri, e))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return Outcome(preprocess_image(data, max_pixels=max_pixels), None, len(data), sha256)
    except ImageError as e:
        return Outcome(None, e, len(data), sha256)


class PreprocessFn(beam.DoFn):
    """Loaded -> (Meta, pixels) for RunInference, or (key, error row) on the errors output.

    Reading and decoding run on a small thread pool up to `lookahead` inputs
    ahead of the output, so remote reads wait in parallel and the next batch is
    decoded while the model runs on this one (file reads, hashing and PIL
    release the GIL). Inputs that arrive with their bytes (archive members) wait
    only while those bytes total at most `pending_bytes`, and are let go once
    decoded: memory stays bounded whatever the inputs' sizes. Outputs keep input
    order; counters are updated on the bundle's thread, where Beam records them.
    """

    def __init__(
        self,
        namespace: str,
        max_pixels: int = MAX_PIXELS,
        threads: int = 2,
        lookahead: int = 64,
        progress_dir: str | None = None,
        max_bytes: int = MAX_BYTES,
        pending_bytes: int = PENDING_BYTES,
    ):
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.pending_bytes = pending_bytes
        self.threads = threads
        self.lookahead = lookahead
        self.tally = Tally(namespace, progress_dir)

    @classmethod
    def from_flags(cls, namespace: str, args: Any, progress_dir: str | None) -> PreprocessFn:
        """From the flags of `beam_jobs.flags.add_common_flags`: two batches of lookahead."""
        return cls(
            namespace,
            args.max_pixels,
            args.decode_threads,
            2 * args.batch_size,
            progress_dir,
            args.max_bytes,
        )

    def setup(self) -> None:
        self.tally.setup()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def start_bundle(self) -> None:
        # (decoding, key, uri, bytes held, timestamp, window) in input order
        self.pending: collections.deque[tuple[Future, str, str, int, Any, Any]] = (
            collections.deque()
        )
        self.held = 0  # bytes of the pending inputs that came with them

    def process(
        self,
        item: Loaded,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[Any]:
        future = self.pool.submit(load_and_decode, item, self.max_pixels, self.max_bytes)
        held = len(item.data) if item.data is not None else 0
        self.pending.append((future, item.key, item.uri, held, timestamp, window))
        self.held += held
        while self.pending and (
            len(self.pending) > self.lookahead
            or self.held > self.pending_bytes
            or self.pending[0][0].done()
        ):
            yield self._emit_oldest()

    def finish_bundle(self) -> Iterator[Any]:
        while self.pending:
            yield self._emit_oldest()
        self.tally.flush()

    def _emit_oldest(self) -> Any:
        future, key, uri, held, timestamp, window = self.pending.popleft()
        outcome: Outcome = future.result()
        self.held -= held
        if outcome.nbytes:
            self.tally.inc("images_read")
            self.tally.inc("bytes_read", outcome.nbytes)
        if outcome.decoded is None:
            error = outcome.error
            self.tally.inc("images_failed")
            self.tally.inc(ERROR_PREFIX + error.kind)
            row = (key, error_row(uri, error.kind, str(error)))
            return beam.pvalue.TaggedOutput(ERRORS_TAG, WindowedValue(row, timestamp, (window,)))
        self.tally.inc("images_decoded")
        d = outcome.decoded
        value = (Meta(key, d.width, d.height, outcome.sha256), d.pixels)
        return WindowedValue(value, timestamp, (window,))

    def teardown(self) -> None:
        if pool := getattr(self, "pool", None):
            pool.shutdown(wait=False, cancel_futures=True)


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
