"""The caption table: a Delta Lake table at --output_dir, one commit per caption run.

Workers write Parquet data files with unique names into the table's folder as rows are
finished (`beam_jobs.parts`); a file is part of the table only once a commit names it in
`_delta_log/`, so readers (DuckDB, pandas, polars, Spark, BigQuery) see a run's rows all
at once or not at all. This module holds what the launcher does with the table, each a
small function over `deltalake`:

- `open_table` / `table_settings`: the table as this run finds it (its version, and the
  model and decoding of its rows, from the log's per-file statistics: no data is read);
- `add_action`: a data file (`beam_jobs.parts`) as a Delta `add` action;
- `commit`: a run's files (and the error files it rewrote) in one transaction, `append`
  for --skip_existing and `overwrite` otherwise, with the run's summary as the commit's
  metadata. Every caption commit carries the application transaction `APP_ID`, so two
  runs that overlap in time cannot both commit: Delta's conflict check fails the second.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.parts import read_parquet, write_part
from beam_jobs.paths import is_local
from model.cli import UsageError
from model.io import formats

APP_ID = "show-attend-tell/caption_images"
LOG_DIR = "_delta_log"
# Delta keeps files a commit removed (a replaced run's, a compaction's inputs) this long,
# so readers of older versions still find them; `vacuum` deletes them after it.
RETENTION_HOURS = 168


def storage_options(path: str) -> dict[str, str] | None:
    """What delta-rs needs beyond the defaults: on gs://, Google's STORAGE_EMULATOR_HOST
    (which Beam's GcsIO and Google's clients honour) points it at an emulator too."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not path.startswith("gs://") or not host:
        return None
    host = host if "://" in host else f"http://{host}"
    key = {
        "gcs_base_url": host,
        "disable_oauth": True,
        "client_email": "",
        "private_key": "",
        "private_key_id": "",
    }
    return {
        "google_service_account_key": json.dumps(key),
        "allow_http": "true",
    }


def table_uri(output_dir: str) -> str:
    return os.path.abspath(output_dir) if is_local(output_dir) else output_dir.rstrip("/")


def open_table(output_dir: str, version: int | None = None, old_layout_ok: bool = False) -> Any:
    """The Delta table at `output_dir` (at `version`, else the latest), or None if there is
    none yet. A folder of the old layout (captions-*.parquet + manifest.json) is refused
    unless `old_layout_ok`."""
    from deltalake import DeltaTable

    uri = table_uri(output_dir)
    options = storage_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=options):
        if not old_layout_ok:
            refuse_old_layout(output_dir)
        return None
    return DeltaTable(uri, version=version, storage_options=options)


def refuse_old_layout(output_dir: str) -> None:
    manifest = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    if FileSystems.exists(manifest):
        raise UsageError(
            f"{output_dir} holds captions in the old layout (captions-*.parquet, manifest.json); "
            f"convert it to a Delta table with: python -m beam_jobs.caption_table convert "
            f"{output_dir}"
        )


def data_files(table: Any) -> dict[str, int]:
    """The table's live data files: full uri -> size in bytes (from the log)."""
    actions = _pylist(table.get_add_actions(flatten=True), ["path", "size_bytes"])
    root = table.table_uri.rstrip("/")
    if root.startswith("file://"):
        root = root[len("file://") :]
    return {f"{root}/{a['path']}": int(a["size_bytes"]) for a in actions}


def table_settings(table: Any) -> dict[str, list[Any]]:
    """Each settings column (`formats.CAPTION_SETTINGS_COLUMNS`) -> the distinct values its
    rows hold, from the per-file min and max statistics in the log (no data file is read).
    A column whose files all hold one value answers [that value]."""
    columns = [c for c in formats.CAPTION_SETTINGS_COLUMNS]
    wanted = [f"{side}.{c}" for c in columns for side in ("min", "max")]
    actions = table.get_add_actions(flatten=True)
    present = set(actions.schema.names)
    rows = _pylist(actions, [w for w in wanted if w in present])
    found: dict[str, set[Any]] = {c: set() for c in columns}
    for row in rows:
        for c in columns:
            found[c].update(v for v in (row.get(f"min.{c}"), row.get(f"max.{c}")) if v is not None)
    return {c: sorted(v, key=str) for c, v in found.items()}


def _pylist(arrow_like: Any, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow as pa

    table = pa.table(arrow_like)
    return table.select(columns).to_pylist() if columns else [{}] * table.num_rows


def add_action(part: Mapping[str, Any]) -> Any:
    """A written data file ({"name", "size", "stats"}) as a Delta `add` action."""
    from deltalake.transaction import AddAction

    return AddAction(
        part["name"], int(part["size"]), {}, int(time.time() * 1000), True, part["stats"]
    )


def remove_action(name: str, size: int) -> Any:
    from deltalake.transaction import RemoveAction

    return RemoveAction(name, True, int(time.time() * 1000), size, {})


def commit(
    output_dir: str,
    base_version: int | None,
    adds: Sequence[Mapping[str, Any]],
    removes: Sequence[tuple[str, int]],
    replace: bool,
    summary: Mapping[str, Any],
    schema: Any = formats.CAPTION_TABLE_SCHEMA,
) -> int:
    """Commits a run's data files as one Delta transaction on top of `base_version` (the
    version the run read; None: there was no table); returns the new version.

    `replace` makes it an overwrite (the run's rows become the whole table); otherwise an
    append that also removes `removes` (files whose rows this run superseded, rewritten
    among `adds`). A commit that another caption run's commit beat to the table fails
    with one line: nothing of this run is committed, and a rerun with --skip_existing
    adds what it still lacks."""
    from deltalake import CommitProperties, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import create_table_with_add_actions

    uri = table_uri(output_dir)
    actions = [add_action(a) for a in adds]
    metadata = {"caption_run": json.dumps(summary, sort_keys=True)}
    try:
        if base_version is None:
            create_table_with_add_actions(
                uri,
                Schema.from_arrow(schema),
                actions,
                mode="error",
                storage_options=storage_options(uri),
                commit_properties=CommitProperties(
                    custom_metadata=metadata, app_transactions=[app_transaction(1)]
                ),
            )
            return 0
        table = widen(output_dir, base_version, schema)
        previous = table.transaction_version(APP_ID) or 0
        if not replace:
            actions += [remove_action(name, size) for name, size in removes]
        table.create_write_transaction(
            actions,
            "overwrite" if replace else "append",
            table.schema(),
            commit_properties=CommitProperties(
                custom_metadata=metadata,
                app_transactions=[app_transaction(previous + 1)],
            ),
        )
    except (CommitFailedError, DeltaError) as e:
        lost_race = isinstance(e, CommitFailedError) or "already exists" in str(e)
        if not lost_race:
            raise
        raise UsageError(
            f"{output_dir}: another run committed to this table while this one ran "
            f"({str(e).splitlines()[0]}); nothing of this run was committed: run the same "
            "command again with --skip_existing to add what the table still lacks"
        ) from None
    return open_table(output_dir).version()


def arrow_schema(table: Any) -> Any:
    import pyarrow as pa

    return pa.schema(table.schema().to_arrow())


def check_columns(table: Any, schema: Any, output_dir: str) -> None:
    """A run whose rows hold a column the table has with another type fails at start."""
    have = arrow_schema(table)
    for field in schema:
        if field.name in have.names and have.field(field.name).type != field.type:
            raise UsageError(
                f"{output_dir} has a column {field.name} of type {have.field(field.name).type}; "
                f"this run's is {field.type} (keep it under another name, or cast it)"
            )


def widen(output_dir: str, base_version: int, schema: Any) -> Any:
    """The table at `base_version`, with the columns of `schema` it lacks added (a commit
    of their own; rows before it read them as null). Raises CommitFailedError if another
    commit came after `base_version`."""
    from deltalake import Field
    from deltalake.exceptions import CommitFailedError

    table = open_table(output_dir, version=base_version)
    missing = [f for f in schema if f.name not in arrow_schema(table).names]
    if not missing:
        return table
    latest = open_table(output_dir)
    if latest.version() != base_version:
        raise CommitFailedError(f"version {latest.version()} is newer than {base_version}")
    latest.alter.add_columns([Field.from_arrow(f) for f in missing])
    return open_table(output_dir, version=base_version + 1)


def app_transaction(version: int) -> Any:
    """The caption runs' application transaction: Delta fails the second of two commits
    that carry it when they overlap in time."""
    from deltalake import Transaction

    return Transaction(APP_ID, version, int(time.time() * 1000))


def run_summaries(output_dir: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The summaries caption runs left in the log, newest first (with the table version
    each made): the counts, model, decoding and looping figures of each commit."""
    table = open_table(output_dir)
    if table is None:
        return []
    out = []
    for entry in table.history(limit):
        if "caption_run" in entry:
            out.append({"version": entry.get("version"), **json.loads(entry["caption_run"])})
    return out


# --- Maintenance: python -m beam_jobs.caption_table COMMAND CAPTIONS_DIR ---------------
# Files under this size count as small: past --compact_above of them, a caption run
# compacts the table after its commit (model.defaults.COMPACT_ABOVE).
SMALL_FILE_BYTES = 32 * 1024 * 1024


def small_files(table: Any) -> int:
    sizes = _pylist(table.get_add_actions(flatten=True), ["size_bytes"])
    return sum(1 for s in sizes if int(s["size_bytes"]) < SMALL_FILE_BYTES)


def compact(output_dir: str) -> dict[str, Any]:
    """Rewrites the table's small files into few large ones (Delta `optimize`), in one
    commit that changes no row; the replaced files stay for readers of older versions
    until `vacuum`. Returns delta-rs's metrics (files added and removed, ...)."""
    table = open_table(output_dir)
    if table is None:
        raise UsageError(f"{output_dir}: no caption table here")
    return table.optimize.compact(target_size=4 * SMALL_FILE_BYTES)


def vacuum(output_dir: str, retention_hours: float, dry_run: bool) -> list[str]:
    """Deletes files no version newer than `retention_hours` reads: those that commits
    removed (replaced runs, compacted files) and those no commit ever named (files of
    killed runs that no resume adopted). Returns them."""
    table = open_table(output_dir)
    if table is None:
        raise UsageError(f"{output_dir}: no caption table here")
    return table.vacuum(
        retention_hours=int(retention_hours),
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=True,
    )


def convert(output_dir: str) -> int:
    """A folder of the old layout (captions-*.parquet, errors-*.parquet, manifest.json)
    becomes a Delta table in place: the files the manifest lists are rewritten as rows of
    the table in one commit, then the old files and the manifest go. Returns the rows."""
    import pyarrow as pa

    from model.text.ngrams import has_repeated_ngram

    if open_table(output_dir, old_layout_ok=True) is not None:
        raise UsageError(f"{output_dir} is a Delta table already")
    out = output_dir.rstrip("/")
    manifest = formats.read_manifest(f"{out}/{formats.MANIFEST_FILE}", formats.KIND_CAPTIONS)
    decoding = manifest.get("decoding") or {}
    settings = {
        "precision": manifest.get("precision", "float32"),
        "beam_size": decoding.get("beam_size", 1),
        "length_penalty": float(decoding.get("length_penalty", 0.0)),
        "block_repeats": decoding.get("block_repeats", 0),
        "allow_unk": bool(decoding.get("allow_unk", False)),
        "run_id": manifest.get("run_id") or "converted",
    }
    parts, old = [], []
    for name in sorted(manifest.get("files", [])):
        path = f"{out}/{name}"
        rows = read_parquet(path).to_pylist()
        for row in rows:
            row.setdefault("model_id", manifest.get("model_id"))
            row.update(settings, key=row["uri"])
            if row.get("caption") is not None:
                row["repeated_trigram"] = has_repeated_ngram(row["caption"].split())
        table = pa.Table.from_pylist(rows, schema=formats.CAPTION_TABLE_SCHEMA)
        parts.append(write_part(out, f"part-converted-{name}", table, None, formats.PARQUET_CODEC))
        old.append(path)
    rows = sum(p["rows"] for p in parts)
    summary = {"converted_from": manifest.get("run_id"), "counts": manifest.get("counts")}
    commit(output_dir, None, parts, [], True, summary)
    FileSystems.delete([*old, f"{out}/{formats.MANIFEST_FILE}"])
    return rows


def history(output_dir: str, limit: int) -> list[str]:
    """One line per caption commit, newest first: version, mode, counts, model, decoding."""
    lines = []
    for run in run_summaries(output_dir, limit):
        counts = run.get("counts") or {}
        lines.append(
            f"v{run['version']} {run.get('mode', '?'):7} "
            + " ".join(f"{k} {v}" for k, v in counts.items())
            + f" | model {run.get('model_id')} beam {run.get('beam_size')} run {run.get('run_id')}"
        )
    return lines


def duckdb_connection(*extensions: str) -> Any:
    """A DuckDB connection with the `delta` extension (and `extensions`, e.g. httpfs for
    gs://) loaded from their PyPI packages (`duckdb-extension-NAME`, pinned to DuckDB's
    version by the [query] extra), so nothing is downloaded; where a package is missing,
    DuckDB's own `LOAD NAME` (which downloads it once)."""
    import glob
    import importlib

    import duckdb

    con = duckdb.connect()
    for name in ("delta", *extensions):
        try:
            folder = os.path.dirname(importlib.import_module(f"duckdb_extension_{name}").__file__)
        except ImportError:
            con.execute(f"LOAD {name}")
            continue
        [path] = glob.glob(f"{folder}/extensions/v{duckdb.__version__}/{name}.duckdb_extension")
        con.execute(f"LOAD '{path}'")
    return con


def query(output_dir: str, sql: str) -> Any:
    """Runs `sql` with the table as the view `captions` (DuckDB's delta_scan)."""
    from model.cli import require

    require("duckdb", "pip install -e '.[query]'")
    con = duckdb_connection()
    uri = table_uri(output_dir).replace("'", "''")
    con.execute(f"CREATE VIEW captions AS SELECT * FROM delta_scan('{uri}')")
    return con.sql(sql)


def main(argv: Sequence[str] | None = None) -> None:
    """python -m beam_jobs.caption_table {history,sql,compact,vacuum,convert} CAPTIONS_DIR"""
    import argparse

    from model.cli import run_cli

    def run(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(
            description="Looks after a caption table (a Delta Lake table written by "
            "beam_jobs.caption_images).",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("command", choices=["history", "sql", "compact", "vacuum", "convert"])
        p.add_argument("captions_dir", help="CAPTIONS_DIR, local or gs://")
        p.add_argument("sql", nargs="?", help="sql: a query of the view `captions`")
        p.add_argument("--limit", type=int, default=20, help="history: how many commits")
        p.add_argument(
            "--retention_hours",
            type=float,
            default=RETENTION_HOURS,
            help="vacuum: keep what versions this recent read",
        )
        p.add_argument("--dry_run", action="store_true", help="vacuum: only list the files")
        a = p.parse_args(argv)
        if a.command == "history":
            print("\n".join(history(a.captions_dir, a.limit)) or "no caption commits")
        elif a.command == "sql":
            query(a.captions_dir, a.sql or "SELECT * FROM captions LIMIT 10").show()
        elif a.command == "compact":
            metrics = compact(a.captions_dir)
            print(
                f"compacted {metrics.get('numFilesRemoved', 0)} files into "
                f"{metrics.get('numFilesAdded', 0)}"
            )
        elif a.command == "vacuum":
            gone = vacuum(a.captions_dir, a.retention_hours, a.dry_run)
            print(f"{'would delete' if a.dry_run else 'deleted'} {len(gone)} files")
        else:
            print(f"converted {convert(a.captions_dir)} rows into a Delta table")

    run_cli(run, argv)


if __name__ == "__main__":
    main()
