"""One caption run's life on its --output_dir: plan, staging, resume, manifest, commit.

The pipeline (`beam_jobs.caption_pipeline`) only builds the graph; this module owns
everything the run leaves on disk, through four calls:

    plan = plan_run(args, export_manifest)    # resume a killed run, or start one
    ... the graph writes parts into plan.staging, then `write_staged_manifest` ...
    commit_run(args.output_dir, plan)          # move in, manifest, delete old
    # or discard_run(plan) when nothing ran (--dry_run)

- A run stages in OUTPUT_DIR/.staging-RUN_ID/ (parts, then the manifest); its
  `run.json` records what makes two runs the same run (`run_identity`).
- `plan_run` first finishes any commit a kill interrupted (`beam_jobs.commit`), then
  resumes the staging folder of this very command when `--skip_existing` asks, adopting
  its finished parts (`beam_jobs.parts`), and removes every other run's staging. The
  caller holds the lease on OUTPUT_DIR (`beam_jobs.lease`), so those runs are dead.
- Adding to a table (`--skip_existing`) is refused, in one line, for another model's
  or another decoding's rows (`check_one_model`, `check_one_decoding`).
- The staged manifest is written only when every input is in one table or the other;
  otherwise the run fails loudly rather than describing a silent loss.
"""

from __future__ import annotations

import argparse
import errno
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.commit import (
    commit,
    finish_commit,
    read_commit_plan,
    resumable,
    staging_dir,
    stale_staging,
    supersede_retried_errors,
    write_run_record,
)
from beam_jobs.parts import (
    finished_parts,
    read_parquet,
    remove_inflight,
    row_count,
    without_overlaps,
)
from beam_jobs.paths import absolute
from model.cli import UsageError, decoding_settings
from model.io import formats


def check_export(export_dir: str) -> dict[str, Any]:
    """Fails at start, in one line, on a missing or incompatible export."""
    paths = formats.export_paths(export_dir)
    manifest = formats.read_manifest(paths["manifest"], formats.KIND_EXPORT)
    formats.check_backbone(manifest["features"], paths["manifest"])
    for key in ("model", "vocab"):
        if not FileSystems.exists(paths[key]):
            raise formats.FormatError(f"{paths[key]}: missing from the export")
    return manifest


def check_one_model(
    existing: list[str], model_id: str, output_dir: str, allow_mixed: bool = False
) -> None:
    """--skip_existing adds rows to a table: refuse, in one line, to add another model's."""
    ids: set[str] = set()
    for path in existing:
        if posixpath.basename(path).startswith("captions-"):
            ids.update(read_parquet(path, ["model_id"]).column(0).unique().to_pylist())
    others = sorted(ids - {model_id})
    if others and not allow_mixed:
        raise UsageError(
            f"{output_dir} holds captions of model {', '.join(others)} and this export is "
            f"{model_id}: --skip_existing would mix models in one table "
            "(use another --output_dir, or --allow_mixed_models)"
        )


def check_one_decoding(output_dir: str, decoding: dict[str, Any], allow_mixed: bool) -> None:
    """--skip_existing adds rows to a table: refuse, in one line, rows decoded otherwise
    (beam rows in a greedy table would make the manifest's decoding untrue)."""
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    if allow_mixed or not FileSystems.exists(path):
        return
    before = formats.read_manifest(path, formats.KIND_CAPTIONS).get("decoding") or {}
    diff = {k: (before.get(k), v) for k, v in decoding.items() if k in before and before[k] != v}
    if diff:
        raise UsageError(
            f"{output_dir} holds captions decoded with "
            + ", ".join(f"{k} {a}" for k, (a, _) in diff.items())
            + "; this run has "
            + ", ".join(f"{k} {b}" for k, (_, b) in diff.items())
            + ": --skip_existing would mix decodings in one table "
            "(use the same flags, another --output_dir, or --allow_mixed_models)"
        )


def existing_outputs(output_dir: str) -> list[str]:
    found = []
    for table in ("captions", "errors"):
        pattern = f"{output_dir.rstrip('/')}/{table}-*.parquet"
        found += [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    return sorted(found)


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, and what it builds on."""

    run_id: str
    staging: str  # CAPTIONS_DIR/.staging-RUN_ID: parts, then the manifest
    add: bool  # adds to the committed tables (--skip_existing) instead of replacing them
    existing: list[str] = field(default_factory=list)  # the committed table files
    adopted: list[str] = field(default_factory=list)  # parts of the killed run resumed
    adopted_counts: dict[str, int] = field(default_factory=dict)  # their captioned, failed


def write_staged_manifest(
    _: None,
    output_dir: str,
    body: dict[str, Any],
    captioned: int,
    failed: int,
    files: list[str],
    inputs: int | None = None,
    adopted: RunPlan | None = None,
) -> str:
    """Writes CAPTIONS_DIR/manifest.json once every table file is final. `inputs` counts
    the distinct uris to caption, after grouping: if they are not all in one table or
    the other, the job fails here, loudly, instead of describing a silent loss. The
    parts `adopted` from a killed run count as well."""
    inputs = captioned + failed if inputs is None else inputs
    if captioned + failed != inputs:
        raise RuntimeError(
            f"{inputs} inputs but {captioned} captions and {failed} error rows: "
            f"{inputs - captioned - failed} input(s) are in neither table"
        )
    before = adopted.adopted_counts if adopted else {}
    captioned += before.get("captioned", 0)
    failed += before.get("failed", 0)
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    formats.write_manifest(
        path,
        formats.KIND_CAPTIONS,
        {
            **body,
            "counts": {"captioned": captioned, "failed": failed, "inputs": captioned + failed},
            "files": sorted(
                {os.path.basename(f) for f in [*files, *(adopted.adopted if adopted else [])]}
            ),
        },
    )
    return path


def run_identity(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: a killed one is resumed only by its own command."""
    return {
        "model_id": manifest["model_id"],
        "inputs": sorted(absolute(s) for s in args.input),
        "precision": args.precision or manifest["features"].get("precision", "float32"),
        "decoding": decoding_settings(args),
        "max_bytes": args.max_bytes,
        "max_pixels": args.max_pixels,
    }


def adopt_parts(staging: str, run_id: str) -> tuple[list[str], dict[str, int]]:
    """A killed run's finished parts (half-written ones deleted, and any whose uris an
    earlier part holds), and how many captions and error rows they hold."""
    remove_inflight(staging)
    tables = ("captions", "errors")
    parts = without_overlaps([p for t in tables for p in finished_parts(staging, f"{t}-{run_id}")])
    counts = {
        key: sum(row_count(p) for p in parts if posixpath.basename(p).startswith(f"{t}-"))
        for key, t in (("captioned", "captions"), ("failed", "errors"))
    }
    return parts, counts


def plan_run(args: argparse.Namespace, manifest: dict[str, Any]) -> RunPlan:
    """Resumes the killed run this command started (with --skip_existing), or starts a new
    one; removes every other unfinished run's staging folder."""
    identity = run_identity(args, manifest)
    for folder in stale_staging(args.output_dir):
        if read_commit_plan(folder) is not None:  # killed while committing: finish it
            finish_commit(folder)
            print(f"caption_images: finished the commit of {folder}, killed while committing")
    stale = stale_staging(args.output_dir)
    found = resumable(stale, identity) if args.skip_existing else None
    for folder in stale:
        if not found or folder != found[0]:
            FileSystems.delete([folder])
            print(f"caption_images: removed {folder}, left by a run that did not finish")
    existing = existing_outputs(args.output_dir)
    if found:
        staging, record = found
        adopted, counts = adopt_parts(staging, record["run_id"])
        plan = RunPlan(
            record["run_id"],
            staging,
            bool(record["add"]),
            existing,
            adopted,
            counts,
        )
        print(
            f"caption_images: resuming run {plan.run_id}, killed after "
            f"{counts['captioned']} captions and {counts['failed']} error rows"
        )
    else:
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        plan = RunPlan(
            run_id,
            staging_dir(args.output_dir, run_id),
            bool(args.skip_existing and existing),
            existing,
        )
        write_run_record(plan.staging, {"run_id": run_id, "add": plan.add, "identity": identity})
    if plan.add:
        check_one_model(existing, manifest["model_id"], args.output_dir, args.allow_mixed_models)
        check_one_decoding(args.output_dir, decoding_settings(args), args.allow_mixed_models)
    return plan


def commit_run(output_dir: str, plan: RunPlan) -> None:
    """The pipeline finished: the staged tables replace the committed ones (or, with
    --skip_existing, join them; error rows of inputs tried again are superseded)."""
    if plan.existing and not plan.add:
        print(f"caption_images: replacing {len(plan.existing)} files of the previous run")
    retried = supersede_retried_errors(plan.staging, plan.existing) if plan.add else 0
    if retried:
        print(f"caption_images: {retried} input(s) that failed before were tried again")
    commit(output_dir, plan.staging, plan.existing, add=plan.add, retried=retried)


def discard_run(plan: RunPlan) -> None:
    """Nothing ran (--dry_run): remove the staging folder, unless it holds a killed run's
    parts that a later resume needs."""
    if not plan.adopted:
        FileSystems.delete([plan.staging])


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
    staged = stale_staging(output_dir)
    sizes = {
        folder: sum(m.size_in_bytes for m in FileSystems.match([f"{folder}/*"])[0].metadata_list)
        for folder in staged
    }
    kept = (
        "its finished parts are kept in "
        + ", ".join(f"{f} ({sizes[f] / 1e6:.1f} MB)" for f in staged)
        + "; free space, then run the same command with --skip_existing to resume (or delete "
        "that folder to discard them)"
        if staged
        else "nothing was staged; free space and run the command again"
    )
    return f"no space left on the device of {output_dir}: the run stopped before its commit; {kept}"
