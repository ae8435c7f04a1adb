"""Reading the caption table back as its users do: through `deltalake`, DuckDB and polars."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

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


def duckdb_delta() -> Any:
    """A DuckDB connection with the `delta` extension loaded from its PyPI package (offline)."""
    import duckdb
    import duckdb_extension_delta

    folder = os.path.dirname(duckdb_extension_delta.__file__)
    [extension] = glob.glob(f"{folder}/extensions/v{duckdb.__version__}/delta.duckdb_extension")
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    return con
