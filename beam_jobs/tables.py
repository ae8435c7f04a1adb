"""Tables of inputs (`--input_table`): Parquet, CSV or JSON Lines files whose rows name
images by uri, with a key and columns to carry into the caption table.

At launch, `describe_table` matches the table's files and reads the columns of the
first (a Parquet footer, a CSV header, a JSON line): a missing column fails there, in
one line. The rows themselves are read on the workers: Parquet by Beam's own source
(split by row groups), CSV and JSON Lines one file per worker, streamed (a quoted CSV
field may hold a newline, so a CSV cannot be split at any byte), so a table of a
billion rows never passes through the launcher. Each row becomes an `Item` (`row_item`,
pure): its uri (a relative path is relative to the table file's folder), its key (the
key column's value as text, else the uri) and its kept values. A row without a uri or
key, or a CSV line with the wrong number of fields, is an error row, never a drop.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.paths import absolute, is_local
from beam_jobs.sources import Item
from model.cli import UsageError
from model.io.storage import uri_scheme

FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
URI_COLUMNS = ("url", "uri", "path")  # --uri_column's default: the first a table has


@dataclass(frozen=True)
class TableSpec:
    """One --input_table as the launcher found it."""

    pattern: str  # the flag's path or glob (absolute when local)
    kind: str  # parquet, csv or jsonl
    uri_column: str
    key_column: str | None
    keep: tuple[tuple[str, str], ...]  # (input column, caption table column)
    kept_types: tuple[Any, ...]  # pyarrow types of the kept columns, in `keep` order

    @property
    def columns(self) -> list[str]:
        """The columns a row is read with."""
        key = [self.key_column] if self.key_column else []
        wanted = [self.uri_column, *key, *(source for source, _ in self.keep)]
        return list(dict.fromkeys(wanted))

    def kept_fields(self) -> list[Any]:
        import pyarrow as pa

        return [pa.field(c, t) for (_, c), t in zip(self.keep, self.kept_types, strict=True)]


def keep_list(keep_columns: str | None, reserved: Sequence[str] = ()) -> list[tuple[str, str]]:
    """--keep_columns `a,b:b_name,c` as (input column, caption table column) pairs; a
    column the caption table has already fails in one line."""
    keep = []
    for entry in (keep_columns or "").split(","):
        source, _, column = entry.strip().partition(":")
        if source.strip():
            keep.append((source.strip(), column.strip() or source.strip()))
    clash = [c for _, c in keep if c in reserved]
    if clash:
        raise UsageError(
            f"--keep_columns {','.join(clash)}: the caption table has a column of that name; "
            f"keep it under another: --keep_columns {clash[0]}:source_{clash[0]}"
        )
    return keep


def describe_tables(
    patterns: Sequence[str],
    uri_column: str | None,
    key_column: str | None,
    keep: Sequence[tuple[str, str]],
) -> list[TableSpec]:
    """Every --input_table of a run, checked (`describe_table`); `keep` as `keep_list`."""
    return [describe_table(t, uri_column, key_column, keep) for t in patterns]


def kept_fields(specs: Sequence[TableSpec], keep: Sequence[tuple[str, str]] = ()) -> list[Any]:
    """The kept columns of the run, as pyarrow fields: the tables' (with their types), and
    the other `keep` names as text (WebDataset samples fill those); a column that two
    tables give two types fails in one line."""
    import pyarrow as pa

    fields: dict[str, Any] = {}
    for spec in specs:
        for field in spec.kept_fields():
            if fields.setdefault(field.name, field).type != field.type:
                raise UsageError(
                    f"--keep_columns {field.name}: {fields[field.name].type} in one "
                    f"--input_table, {field.type} in {spec.pattern}"
                )
    for _, name in keep:
        fields.setdefault(name, pa.field(name, delta_type(pa.field(name, pa.string()))))
    return list(fields.values())


def table_kind(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((kind for ext, kind in FORMATS.items() if name.endswith(ext)), None)


def table_files(pattern: str) -> list[str]:
    """The files of one --input_table: a file, a glob, or a folder's files (an export's
    folder: Spark's and Hadoop's `_SUCCESS` and hidden files are not rows)."""
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if not found or (is_local(pattern) and os.path.isdir(pattern)):
        found = [m.path for m in FileSystems.match([pattern.rstrip("/") + "/*"])[0].metadata_list]
    return sorted(f for f in found if not posixpath.basename(f).startswith(("_", ".")))


def describe_table(
    pattern: str,
    uri_column: str | None,
    key_column: str | None,
    keep: Sequence[tuple[str, str]],
) -> TableSpec:
    """Checks one --input_table at launch: its files exist and share a format, and the
    columns the flags name are in the first."""
    pattern = absolute(pattern)
    files = table_files(pattern)
    if not files:
        raise UsageError(f"--input_table matches nothing: {pattern}")
    kinds = {table_kind(f) for f in files}
    if None in kinds or len(kinds) > 1:
        names = ", ".join(sorted({posixpath.basename(f) for f in files})[:5])
        raise UsageError(
            f"--input_table {pattern}: every file must be .parquet, .csv or .jsonl "
            f"(optionally .gz), and all of one kind; found {names}"
        )
    kind = kinds.pop()
    columns = first_columns(files[0], kind)
    have = ", ".join(columns) or "none"
    if uri_column is None:
        uri_column = next((c for c in URI_COLUMNS if c in columns), None)
        if uri_column is None:
            raise UsageError(
                f"{files[0]} has no url, uri or path column (it has: {have}); name it with "
                "--uri_column"
            )
    for flag, name in [("--uri_column", uri_column), ("--key_column", key_column)] + [
        ("--keep_columns", source) for source, _ in keep
    ]:
        if name is not None and name not in columns:
            raise UsageError(f"{files[0]} has no column {name!r} ({flag}); it has: {have}")
    return TableSpec(
        pattern, kind, uri_column, key_column, tuple(keep), kept_types(files[0], kind, keep)
    )


def first_columns(path: str, kind: str) -> list[str]:
    """The column names of one table file, read from its start (or footer)."""
    if kind == "parquet":
        return list(parquet_schema(path).names)
    with open_text(path) as f:
        if kind == "csv":
            return next(csv.reader(f), [])
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}: the first line is not JSON: {e}") from None
                return list(record) if isinstance(record, dict) else []
    return []


def parquet_schema(path: str) -> Any:
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_schema(f)


def kept_types(path: str, kind: str, keep: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
    """Kept columns keep a Parquet table's types; CSV and JSON values are kept as text."""
    import pyarrow as pa

    if kind != "parquet":
        return tuple(delta_type(pa.field(c, pa.string())) for _, c in keep)
    schema = parquet_schema(path)
    return tuple(delta_type(schema.field(source)) for source, _ in keep)


def delta_type(field: Any) -> Any:
    """The type a Delta table stores a Parquet column as (dictionary-encoded strings are
    strings, ...); a column Delta has no type for cannot be kept."""
    import pyarrow as pa
    from deltalake import Field

    try:
        return pa.field(Field.from_arrow(field).to_arrow()).type
    except Exception as e:  # noqa: BLE001 - delta-rs says which types it lacks
        raise UsageError(
            f"--keep_columns {field.name}: a Delta table cannot hold its type {field.type} "
            f"({e}); cast it in the input table"
        ) from None


def open_text(path: str) -> io.TextIOWrapper:
    """A table file as text (UTF-8; `.gz` is gunzipped), streamed."""
    raw = FileSystems.open(path, compression_type="auto")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def read_text_table(path: str, spec: TableSpec) -> Iterator[Item]:
    """The rows of one CSV or JSON Lines file, as Items (`row_item`), streamed."""
    with open_text(path) as f:
        if spec.kind == "csv":
            reader = csv.reader(f)
            header = next(reader, [])
            for n, fields in enumerate(reader, start=1):
                if not fields:
                    continue
                if len(fields) != len(header):
                    yield bad_row(
                        path, n, f"{len(fields)} fields where the header has {len(header)}"
                    )
                    continue
                yield row_item(dict(zip(header, fields, strict=True)), spec, path, n)
            return
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                yield bad_row(path, n, f"not JSON: {e}")
                continue
            if not isinstance(record, dict):
                yield bad_row(path, n, f"a JSON {type(record).__name__}, not an object")
                continue
            yield row_item(record, spec, path, n)


def bad_row(path: str, n: int, why: str) -> Item:
    where = f"{path}#row{n}"
    return Item(where, error_type="bad_row", message=f"row {n} of {path}: {why}", key=where)


def row_item(record: dict[str, Any], spec: TableSpec, path: str, n: int | None = None) -> Item:
    """One table row -> the Item it names: uri, key and kept values; an error Item when
    its uri or key is missing. `n` is its row number where the reader knows it."""
    kept = tuple((c, kept_value(record.get(source), spec.kind)) for source, c in spec.keep)
    where = f"{path}#row{n}" if n is not None else f"{path}#{row_digest(record)}"
    raw_uri = record.get(spec.uri_column)
    uri = str(raw_uri).strip() if raw_uri is not None else ""
    key_value = record.get(spec.key_column) if spec.key_column else uri
    key = text(key_value).strip() if key_value is not None else ""
    if not uri:
        key = key or where
        return Item(
            where, error_type="missing_uri", message=f"no {spec.uri_column}", key=key, kept=kept
        )
    uri = resolve(uri, path)
    if not key:
        return Item(
            uri, error_type="missing_key", message=f"no {spec.key_column}", key=where, kept=kept
        )
    return Item(uri, key=key if spec.key_column else uri, kept=kept)


def resolve(uri: str, table_path: str) -> str:
    """A uri as a row gives it: a relative path is relative to the table file's folder."""
    if uri_scheme(uri):
        return uri
    if not posixpath.isabs(uri):
        uri = posixpath.join(posixpath.dirname(table_path), uri)
    return absolute(uri) if is_local(uri) else uri


def text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def kept_value(value: Any, kind: str) -> Any:
    if kind == "parquet" or value is None:
        return value
    return text(value)


def row_digest(record: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
