"""Image inputs to pixels, ahead of the model: `PreprocessFn` and the error rows.

Both jobs read and decode their images here with `model.images.preprocess`, the one
preprocessing path of every stage; an input that cannot be decoded becomes an error
row (`error_row`) on the ERRORS_TAG output, never an exception.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from beam_jobs.progress import ERROR_PREFIX, TallyFn
from beam_jobs.sources import read_failure, read_input
from model.defaults import MAX_BYTES, MAX_PIXELS, PENDING_BYTES
from model.images.fetch import FetchSettings, fetcher_for
from model.images.preprocess import ImageError, PreprocessedImage, preprocess_image

ERRORS_TAG = "errors"


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


def load_and_decode(
    item: Loaded,
    max_pixels: int,
    max_bytes: int = MAX_BYTES,
    fetch: Callable[[str], bytes] | None = None,
) -> Outcome:
    """Reads (if needed; http(s) through `fetch`) and preprocesses one input; never raises
    for a bad input."""
    data = item.data
    if data is None:
        try:
            data = read_input(item.uri, max_bytes, fetch)
        except ImageError as e:  # refused unread, or a fetch that failed
            return Outcome(None, e)
        except Exception as e:  # noqa: BLE001 - any IO failure becomes an error row
            return Outcome(None, read_failure(item.uri, e))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return Outcome(preprocess_image(data, max_pixels=max_pixels), None, len(data), sha256)
    except ImageError as e:
        return Outcome(None, e, len(data), sha256)


class PreprocessFn(TallyFn):
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
        fetch: FetchSettings | None = None,
    ):
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.fetch = fetch
        self.pending_bytes = pending_bytes
        self.threads = threads
        self.lookahead = lookahead
        super().__init__(namespace, progress_dir)

    @classmethod
    def from_flags(
        cls, namespace: str, args: Any, progress_dir: str | None, fetch: FetchSettings | None = None
    ) -> PreprocessFn:
        """From the flags of `beam_jobs.flags.add_common_flags`: two batches of lookahead."""
        return cls(
            namespace,
            args.max_pixels,
            args.decode_threads,
            2 * args.batch_size,
            progress_dir,
            args.max_bytes,
            fetch=fetch,
        )

    def setup(self) -> None:
        super().setup()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        self.fetcher = (
            fetcher_for(dataclasses.replace(self.fetch, max_bytes=self.max_bytes))
            if self.fetch
            else None
        )

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
        fetch = self.fetcher.fetch if self.fetcher else None
        future = self.pool.submit(load_and_decode, item, self.max_pixels, self.max_bytes, fetch)
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
