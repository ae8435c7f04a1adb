"""Reading the caption table back as its users do: through `deltalake`, DuckDB and polars."""

from __future__ import annotations

import json
from typing import Any

from beam_jobs.caption_table import duckdb_connection as duckdb_delta  # noqa: F401
from beam_jobs.caption_table import storage_options, table_uri


def caption_rows(out: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(captioned rows, error rows) of the table at `out`, through deltalake and pyarrow."""
    from deltalake import DeltaTable

    uri = table_uri(str(out))
    rows = DeltaTable(uri, storage_options=storage_options(uri)).to_pyarrow_table().to_pylist()
    return [r for r in rows if r["error_type"] is None], [r for r in rows if r["error_type"]]


def table_uris(out: Any) -> list[str]:
    caps, errs = caption_rows(out)
    return [r["uri"] for r in caps + errs]


def last_run(out: Any) -> dict[str, Any]:
    """The summary the newest caption commit carries (counts, model, decoding, looping)."""
    from deltalake import DeltaTable

    uri = table_uri(str(out))
    for entry in DeltaTable(uri, storage_options=storage_options(uri)).history():
        if "caption_run" in entry:
            return {"version": entry["version"], **json.loads(entry["caption_run"])}
    raise AssertionError(f"{out}: no caption commit")


class Where:
    """A caption table's folder, local or gs:// (the emulator), seen as a user would."""

    def __init__(self, out: str, env: dict[str, str] | None = None):
        self.out = out
        self.env = env or {}

    def __str__(self) -> str:
        return self.out

    def parts(self) -> set[str]:
        """Names of every data file written into the folder (committed or not)."""
        return self._names("part-*.parquet")

    def records(self) -> set[str]:
        return self._names("_caption_runs/*.json")

    def _names(self, pattern: str) -> set[str]:
        from apache_beam.io.filesystems import FileSystems

        found = FileSystems.match([f"{self.out.rstrip('/')}/{pattern}"])[0].metadata_list
        return {m.path.rsplit("/", 1)[1] for m in found}

    def version(self) -> int | None:
        from beam_jobs.caption_table import open_table

        table = open_table(self.out)
        return None if table is None else table.version()

    def rows_in(self, names: set[str]) -> int:
        from beam_jobs.parts import read_parquet

        return sum(read_parquet(f"{self.out}/{n}", ["uri"]).num_rows for n in names)
