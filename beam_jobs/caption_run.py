"""One caption run's life on its table: plan (start or resume), record, commit.

    plan = plan_run(args, export_manifest)   # what the table holds; resume or start
    ... the pipeline writes data files, then its run record (`write_run_record`) ...
    commit_run(args.output_dir, plan, body)  # one Delta commit (`beam_jobs.caption_table`)

A run's data files are `part-ATTEMPT-DIGEST.parquet` in the table's folder, with
ATTEMPT = `IDENTITY-vVERSION-MODE_NONCE`: IDENTITY hashes what makes two runs the same
run (model, inputs, precision, decoding, limits), VERSION is the table version the run
read ("new" when there was no table), MODE is `a` (append) or `r` (replace). Files of
an attempt at the table's current version were never committed (a commit would have
moved the version on), so a rerun of the same command with --skip_existing adopts
them: their rows are not captioned again and join its commit. Nothing is deleted
before a run commits; files no commit names are removed by `vacuum`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs import caption_table
from beam_jobs.parts import read_parquet, without_overlaps
from beam_jobs.paths import absolute, is_local
from beam_jobs.tables import TableSpec, kept_fields
from model.cli import UsageError, decoding_settings
from model.io import formats

RUNS_DIR = "_caption_runs"  # run records: a finished pipeline's files, before the commit
PART_PREFIX = "part-"
# A table file rewritten without rows the run supersedes: a resume never adopts one (its
# pair, the removal of the old file, was not committed), it rewrites the old file again.
REWRITE_PREFIX = "rewrite-"


def check_export(export_dir: str) -> dict[str, Any]:
    """Fails at start, in one line, on a missing or incompatible export."""
    paths = formats.export_paths(export_dir)
    manifest = formats.read_manifest(paths["manifest"], formats.KIND_EXPORT)
    formats.check_backbone(manifest["features"], paths["manifest"])
    for key in ("model", "vocab"):
        if not FileSystems.exists(paths[key]):
            raise formats.FormatError(f"{paths[key]}: missing from the export")
    return manifest


def extractor_settings(
    args: argparse.Namespace, manifest: dict[str, Any]
) -> tuple[str, str, str | None]:
    """(precision, runtime, calibration) of the extractor: the flags', else those of the
    features the model was trained on (`model.images.runtimes.extractor_settings`)."""
    from model.images import runtimes

    return runtimes.extractor_settings(
        args.precision, args.runtime, args.calibration, manifest["features"]
    )


def row_settings(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings columns every row of this run carries (`formats.CAPTION_SETTINGS_COLUMNS`).
    `precision` names the runtime too when it is not TensorFlow (`openvino/float32`)."""
    from model.images.runtimes import identity_precision

    decoding = decoding_settings(args)
    return {
        "model_id": manifest["model_id"],
        "precision": identity_precision(*extractor_settings(args, manifest)),
        "beam_size": decoding["beam_size"],
        "length_penalty": float(decoding["length_penalty"]),
        "block_repeats": decoding["block_repeats"],
        "allow_unk": bool(decoding["allow_unk"]),
    }


def check_same_settings(
    held: dict[str, list[Any]], settings: dict[str, Any], output_dir: str
) -> None:
    """--skip_existing adds rows to a table: refuse, in one line, rows of another model or
    decoding (a table of one model and one decoding is what its readers assume)."""
    diff = {
        column: [v for v in values if v != _comparable(settings[column], v)]
        for column, values in held.items()
    }
    diff = {c: v for c, v in diff.items() if v}
    if not diff:
        return
    what = ", ".join(f"{c} {'/'.join(map(str, v))}" for c, v in diff.items())
    mine = ", ".join(f"{c} {settings[c]}" for c in diff)
    raise UsageError(
        f"{output_dir} holds captions with {what}; this run has {mine}: --skip_existing would "
        "mix them in one table (use the same flags, another --output_dir, or --allow_mixed_models)"
    )


def _comparable(mine: Any, held: Any) -> Any:
    return round(float(mine), 5) if isinstance(held, float) else mine


def identity_hash(
    args: argparse.Namespace, manifest: dict[str, Any], tables: Sequence[TableSpec] = ()
) -> str:
    """What makes two runs the same run: a killed one is resumed only by its own command."""
    identity = {
        **row_settings(args, manifest),
        "inputs": sorted(absolute(s) for s in args.input),
        "max_bytes": args.max_bytes,
        "max_pixels": args.max_pixels,
    }
    if tables:
        identity["tables"] = sorted(
            [t.pattern, t.uri_column, t.key_column, list(t.keep)] for t in tables
        )
    if args.keep_columns:
        identity["keep"] = args.keep_columns
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunPlan:
    """What a run reads and writes."""

    attempt: str  # names the run's data files and its run record; also its run_id
    base_version: int | None  # the table version the run read; None: no table yet
    replace: bool  # the run's rows become the whole table (else: appended to it)
    table_files: dict[str, int] = field(default_factory=dict)  # uri -> size, when appending
    adopted: list[str] = field(default_factory=list)  # a killed attempt's parts (names)
    tables: tuple[TableSpec, ...] = ()  # the --input_table flags, as found at launch
    keep: tuple[tuple[str, str], ...] = ()  # --keep_columns: (input column, table column)
    schema: Any = formats.CAPTION_TABLE_SCHEMA  # of this run's data files (kept columns last)

    @property
    def run_id(self) -> str:
        return self.attempt


def attempt_family(identity: str, version: int | None) -> str:
    return f"{identity}-v{'new' if version is None else version}"


def adoptable_parts(output_dir: str, family: str) -> tuple[list[str], bool]:
    """Complete part files of killed attempts of this family (same command, same table
    version), without any two holding one row; and whether one of them was replacing."""
    pattern = f"{output_dir.rstrip('/')}/{PART_PREFIX}{family}-*.parquet"
    paths = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    readable = []
    for path in paths:
        try:
            read_parquet(path, ["key"])
        except Exception:  # noqa: BLE001 - cut short by a kill: not adopted
            continue
        readable.append(path)
    kept = without_overlaps(readable)
    modes = {posixpath.basename(p)[len(PART_PREFIX) + len(family) + 1] for p in kept}
    return [posixpath.basename(p) for p in kept], "r" in modes


def plan_run(
    args: argparse.Namespace,
    manifest: dict[str, Any],
    tables: Sequence[TableSpec] = (),
    keep: Sequence[tuple[str, str]] = (),
) -> RunPlan:
    """Reads the table (if any), checks that this run may add to it, and resumes the
    killed attempt of this very command when --skip_existing asks. `keep`: the kept
    columns (`beam_jobs.tables.keep_list`)."""
    table = caption_table.open_table(args.output_dir)
    version = None if table is None else table.version()
    schema = formats.caption_table_schema(kept_fields(tables, keep))
    if table is not None:
        caption_table.check_columns(table, schema, args.output_dir)
    if table is not None and args.skip_existing and not args.allow_mixed_models:
        check_same_settings(
            caption_table.table_settings(table), row_settings(args, manifest), args.output_dir
        )
    family = attempt_family(identity_hash(args, manifest, tables), version)
    adopted, was_replacing = (
        adoptable_parts(args.output_dir, family) if args.skip_existing else ([], False)
    )
    replace = table is None or not args.skip_existing or was_replacing
    attempt = f"{family}-{'r' if replace else 'a'}{uuid.uuid4().hex[:6]}"
    if adopted:
        rows = sum(read_parquet(_under(args.output_dir, n), ["key"]).num_rows for n in adopted)
        print(
            f"caption_images: resuming a killed run of this command: {len(adopted)} finished "
            f"file(s), {rows} rows kept"
        )
    return RunPlan(
        attempt,
        version,
        replace,
        {} if replace else caption_table.data_files(table),
        adopted,
        tuple(tables),
        tuple(keep),
        schema,
    )


def _under(output_dir: str, name: str) -> str:
    return f"{output_dir.rstrip('/')}/{name}"


def record_path(output_dir: str, attempt: str) -> str:
    return f"{output_dir.rstrip('/')}/{RUNS_DIR}/{attempt}.json"


def write_run_record(
    _: None,
    output_dir: str,
    attempt: str,
    parts: list[dict[str, Any]],
    rewritten: list[dict[str, Any]],
    adopted: list[dict[str, Any]],
    inputs: int,
    looping: tuple[int, int, int, int],
    distinct: int,
) -> str:
    """The pipeline's last step: the files the run commits, in `RUNS_DIR/ATTEMPT.json`.
    Written only when every input the run took is in a row (captioned or failed):
    otherwise the job fails here, loudly, instead of committing a silent loss."""
    captioned = sum(p["captioned"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    if captioned + failed != inputs:
        raise RuntimeError(
            f"{inputs} inputs but {captioned} captions and {failed} error rows: "
            f"{inputs - captioned - failed} input(s) have no row"
        )
    images, repeated, at_limit, empty = looping
    record = {
        "parts": [*parts, *[r["add"] for r in rewritten if r["add"]], *adopted],
        "removes": [[r["remove"], r["size"]] for r in rewritten],
        "counts": {
            "captioned": captioned + sum(p["captioned"] for p in adopted),
            "failed": failed + sum(p["failed"] for p in adopted),
            "resumed": sum(p["rows"] for p in adopted),
            "superseded": sum(r["dropped"] for r in rewritten),
        },
        "looping": {
            "images": images,
            "repeated_trigram": repeated,
            "at_length_limit": at_limit,
            "distinct_captions": distinct,
            "empty_captions": empty,
        },
    }
    path = record_path(output_dir, attempt)
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(json.dumps(record, sort_keys=True).encode())
    return path


def read_run_record(output_dir: str, attempt: str) -> dict[str, Any]:
    with FileSystems.open(record_path(output_dir, attempt), compression_type="uncompressed") as f:
        return json.loads(f.read())


def commit_run(output_dir: str, plan: RunPlan, body: dict[str, Any]) -> dict[str, Any]:
    """The pipeline finished: its files become one commit of the table; returns the
    summary the commit carries (its counts, model, decoding, looping figures)."""
    record = read_run_record(output_dir, plan.attempt)
    summary = {
        **body,
        "counts": record["counts"],
        "looping": record["looping"],
        "mode": "replace" if plan.replace else "append",
    }
    removes = [(_relative(output_dir, uri), size) for uri, size in record["removes"]]
    version = caption_table.commit(
        output_dir, plan.base_version, record["parts"], removes, plan.replace, summary, plan.schema
    )
    FileSystems.delete([record_path(output_dir, plan.attempt)])
    runs = f"{output_dir.rstrip('/')}/{RUNS_DIR}"
    if is_local(runs):
        with contextlib.suppress(OSError):  # another run's record is still there
            os.rmdir(runs)
    return {**summary, "version": version}


def _relative(output_dir: str, uri: str) -> str:
    root = caption_table.table_uri(output_dir).rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or in the text Beam's runners wrap a worker's
    exception in."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "[Errno 28]" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(output_dir: str) -> str:
    """What a run that filled the disk says, in one line: what it kept, and how to go on."""
    pattern = f"{output_dir.rstrip('/')}/{PART_PREFIX}*.parquet"
    kept = sum(m.size_in_bytes for r in FileSystems.match([pattern]) for m in r.metadata_list)
    return (
        f"no space left on the device of {output_dir}: the run stopped before its commit; "
        f"the table is as it was, and finished files ({kept / 1e6:.2f} MB with earlier runs') "
        "stay: free space, then run the same command with --skip_existing to resume"
    )
