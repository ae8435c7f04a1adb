"""Table rows written as they are finished, so a killed run keeps its work.

`WritePartsFn` buffers rows and writes them as one Parquet "part" file when it
holds `max_rows` rows, when `max_seconds` have passed since its first row, and
at the end of every bundle. A part is written under a hidden temporary name and
renamed into place, so a part file is either complete or absent: a killed run
leaves only whole parts behind, which a rerun with --skip_existing adopts.

A part is named after the uris it holds, so a bundle that a runner retries
writes the same names again instead of new copies; the paths the transform
outputs (exactly once, like any Beam output) are the parts the run commits.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

INFLIGHT = ".inflight-"
# A part holds at most this many rows (about 2 MB of captions as zstd Parquet).
ROWS_PER_PART = 10_000


def part_name(prefix: str, rows: list[dict[str, Any]]) -> str:
    """`PREFIX-DIGEST.parquet`, DIGEST a hash of the rows' uris (the same rows, the same name)."""
    digest = hashlib.sha1("\n".join(sorted(r["uri"] for r in rows)).encode()).hexdigest()
    return f"{prefix}-{digest[:16]}.parquet"


def write_part(folder: str, name: str, rows: list[dict[str, Any]], schema: Any, codec: str) -> str:
    """Writes `rows` as `folder/name`, complete or not at all; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression=codec)
    path = f"{folder.rstrip('/')}/{name}"
    temporary = f"{folder.rstrip('/')}/{INFLIGHT}{uuid.uuid4().hex}-{name}"
    with FileSystems.create(temporary, compression_type="uncompressed") as f:
        f.write(sink.getvalue().to_pybytes())
    FileSystems.rename([temporary], [path])  # replaces what a retried bundle wrote before
    return path


def remove_inflight(folder: str) -> list[str]:
    """Deletes the half-written temporaries a killed run left in `folder`; returns them."""
    pattern = f"{folder.rstrip('/')}/{INFLIGHT}*"
    found = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    if found:
        FileSystems.delete(found)
    return found


def finished_parts(folder: str, prefix: str) -> list[str]:
    """The complete part files `prefix-*.parquet` in `folder`."""
    pattern = f"{folder.rstrip('/')}/{prefix}-*.parquet"
    return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)


def read_parquet(path: str, columns: list[str] | None = None) -> Any:
    """A Parquet file (local or remote, through Beam's FileSystems) as a pyarrow Table:
    the one Parquet reader of the jobs' own outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(pa.BufferReader(f.read()), columns=columns)


def read_uris(path: str) -> list[str]:
    return read_parquet(path, ["uri"]).column(0).to_pylist()


def without_overlaps(paths: list[str]) -> list[str]:
    """The parts, in order, whose uris no earlier part holds; the others are deleted, so
    their rows are captioned again. Two parts share a uri only if a runner retried a
    bundle that had already saved parts, and grouped its rows differently the second time."""
    seen: set[str] = set()
    kept = []
    for path in paths:
        uris = read_uris(path)
        if seen.isdisjoint(uris):
            kept.append(path)
            seen.update(uris)
        else:
            FileSystems.delete([path])
    return kept


def row_count(path: str) -> int:
    """Rows in a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.ParquetFile(f).metadata.num_rows


class WritePartsFn(beam.DoFn):
    """Rows -> part files `folder/PREFIX-DIGEST.parquet`; outputs each part's path."""

    def __init__(
        self,
        folder: str,
        prefix: str,
        schema: Any,
        codec: str,
        max_seconds: float,
        max_rows: int = ROWS_PER_PART,
    ):
        self.folder = folder
        self.prefix = prefix
        self.schema = schema
        self.codec = codec
        self.max_seconds = max_seconds
        self.max_rows = max_rows

    def start_bundle(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.first = 0.0

    def process(self, row: dict[str, Any]) -> Iterator[str]:
        if not self.rows:
            self.first = time.monotonic()
        self.rows.append(row)
        full = len(self.rows) >= self.max_rows
        if full or time.monotonic() - self.first >= self.max_seconds:
            yield self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        if self.rows:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> str:
        rows, self.rows = self.rows, []
        name = part_name(self.prefix, rows)
        return write_part(self.folder, name, rows, self.schema, self.codec)
