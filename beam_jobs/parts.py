"""Table rows written as they are finished, so a killed run keeps its work.

`WritePartsFn` buffers rows and writes them as one Parquet "part" file when it
holds `max_rows` rows, when `max_seconds` have passed since its first row, and
at the end of every bundle. A part is written under a hidden temporary name and
renamed into place, so a part file is either complete or absent: a killed run
leaves only whole parts behind, which a rerun with --skip_existing adopts.

A part is named after the rows it holds (`row_identity`), so a bundle that a runner retries
writes the same names again instead of new copies; the parts the transform
outputs (exactly once, like any Beam output: name, size and Delta statistics)
are the ones the run commits (`beam_jobs.caption_table`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

# Not hidden: `vacuum` removes what a kill left of one (it passes over hidden names).
INFLIGHT = "inflight-"
# A part holds at most this many rows (about 2 MB of captions as zstd Parquet).
ROWS_PER_PART = 10_000


IDENTITY_COLUMNS = ["key", "uri", "error_type", "message"]


def row_identity(row: dict[str, Any]) -> str:
    """What tells a row from every other row of a run: its key and uri, and for an error
    row its type and message (a key's duplicate claims differ there)."""
    return "\0".join(str(row.get(c) or "") for c in IDENTITY_COLUMNS)


def part_name(prefix: str, rows: list[dict[str, Any]]) -> str:
    """`PREFIX-DIGEST.parquet`, DIGEST a hash of the rows (the same rows, the same name)."""
    digest = hashlib.sha1("\n".join(sorted(map(row_identity, rows))).encode()).hexdigest()
    return f"{prefix}-{digest[:16]}.parquet"


def write_part(
    folder: str, name: str, rows: list[dict[str, Any]] | Any, schema: Any, codec: str
) -> dict[str, Any]:
    """Writes `rows` (dicts, or a pyarrow Table) as `folder/name`, complete or not at all;
    returns the part: its name, size, row count and Delta statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=codec)
    data = sink.getvalue().to_pybytes()
    path = f"{folder.rstrip('/')}/{name}"
    temporary = f"{folder.rstrip('/')}/{INFLIGHT}{uuid.uuid4().hex}-{name}"
    with FileSystems.create(temporary, compression_type="uncompressed") as f:
        f.write(data)
    FileSystems.rename([temporary], [path])  # replaces what a retried bundle wrote before
    return part_record(name, len(data), table)


def part_record(name: str, size: int, table: Any) -> dict[str, Any]:
    """What a commit needs of a data file: name (relative to the table), size, rows, stats."""
    failed = 0
    if "error_type" in table.column_names:
        failed = table.num_rows - table["error_type"].null_count
    return {
        "name": name,
        "size": size,
        "rows": table.num_rows,
        "captioned": table.num_rows - failed,
        "failed": failed,
        "stats": file_stats(table),
    }


def file_stats(table: Any) -> str:
    """Delta statistics of a data file's rows (a pyarrow Table): numRecords, nullCount of
    every column, and min/max of the scalar columns whose values are finite. Readers
    skip files by these, so they are computed from the rows themselves."""
    import pyarrow as pa
    import pyarrow.compute as pc

    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name in table.column_names:
        column = table[name]
        nulls[name] = column.null_count
        kind = column.type
        if not (
            pa.types.is_string(kind)
            or pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)
        ):
            continue
        if column.null_count == len(column):
            continue
        bounds = pc.min_max(column).as_py()
        lo, hi = bounds["min"], bounds["max"]
        if isinstance(lo, float) and not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        minimum[name], maximum[name] = lo, hi
    return json.dumps(
        {
            "numRecords": table.num_rows,
            "minValues": minimum,
            "maxValues": maximum,
            "nullCount": nulls,
        },
        allow_nan=False,
    )


def read_parquet(path: str, columns: list[str] | None = None) -> Any:
    """A Parquet file (local or remote, through Beam's FileSystems) as a pyarrow Table:
    the one Parquet reader of the jobs' own outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(pa.BufferReader(f.read()), columns=columns)


def row_identities(path: str) -> list[str]:
    return [row_identity(r) for r in read_parquet(path, IDENTITY_COLUMNS).to_pylist()]


def without_overlaps(paths: list[str]) -> list[str]:
    """The parts, in order, whose rows no earlier part holds; the others are left out (their
    rows are captioned again; `vacuum` removes the files). Two parts share a row only if a
    runner retried a bundle that had already saved parts, and grouped its rows otherwise."""
    seen: set[str] = set()
    kept = []
    for path in paths:
        rows = row_identities(path)
        if seen.isdisjoint(rows):
            kept.append(path)
            seen.update(rows)
    return kept


class WritePartsFn(beam.DoFn):
    """Rows -> part files `folder/PREFIX-DIGEST.parquet`; outputs each part (`write_part`)."""

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

    def process(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not self.rows:
            self.first = time.monotonic()
        self.rows.append(row)
        full = len(self.rows) >= self.max_rows
        if full or time.monotonic() - self.first >= self.max_seconds:
            yield self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        if self.rows:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> dict[str, Any]:
        rows, self.rows = self.rows, []
        name = part_name(self.prefix, rows)
        return write_part(self.folder, name, rows, self.schema, self.codec)
