"""CAPTIONS_DIR changes only when a run is complete; a killed run's finished work is kept.

A run writes into `CAPTIONS_DIR/.staging-RUN_ID/`: first `run.json` (what the
run is: model, inputs, decoding, whether it adds to the table or replaces it),
then its table rows as part files as they are finished (`beam_jobs.parts`),
then its manifest. Only after the pipeline has finished does `commit` delete
the tables it replaces (none when it adds), move the new files in, and move
the manifest in last.

A run killed at any moment before that leaves the previous tables as they
were, plus its staging folder. A rerun of the same command with
--skip_existing resumes it: it adopts the finished parts, captions only the
rest, and commits as the killed run would have. Any other rerun removes the
folder. The moves themselves take milliseconds on a local disk.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.parts import read_parquet
from beam_jobs.paths import is_local
from model.io import formats

STAGING_PREFIX = ".staging-"
RUN_FILE = "run.json"


def staging_dir(output_dir: str, run_id: str) -> str:
    return f"{output_dir.rstrip('/')}/{STAGING_PREFIX}{run_id}"


def _matches(pattern: str) -> list[str]:
    return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)


def stale_staging(output_dir: str) -> list[str]:
    """The staging folders of runs that did not finish, oldest first."""
    if not is_local(output_dir):  # an object store: a folder is the prefix of its objects
        files = _matches(f"{output_dir.rstrip('/')}/{STAGING_PREFIX}*/**")
        folders = sorted({f.split(STAGING_PREFIX, 1)[1].split("/", 1)[0] for f in files})
    else:
        entries = os.listdir(output_dir) if os.path.isdir(output_dir) else []
        folders = sorted(e[len(STAGING_PREFIX) :] for e in entries if e.startswith(STAGING_PREFIX))
    return [staging_dir(output_dir, name) for name in folders]


def write_run_record(staging: str, record: dict[str, Any]) -> None:
    """`staging/run.json`: what a run is, so that a rerun can tell whether to resume it."""
    if is_local(staging):
        os.makedirs(staging, exist_ok=True)
    with FileSystems.create(f"{staging}/{RUN_FILE}", mime_type="application/json") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True).encode())


def read_run_record(staging: str) -> dict[str, Any] | None:
    """A killed run's record; None if it has none or it is unreadable (killed while writing)."""
    try:
        with FileSystems.open(f"{staging}/{RUN_FILE}", compression_type="uncompressed") as f:
            record = json.loads(f.read())
    except Exception:  # noqa: BLE001 - missing or half-written: not resumable
        return None
    return record if isinstance(record, dict) else None


def resumable(stale: list[str], identity: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The newest staging folder of a killed run with this `identity` (model, inputs,
    decoding), and its record; None if there is none."""
    for staging in reversed(stale):
        record = read_run_record(staging)
        if record and record.get("identity") == identity:
            return staging, record
    return None


def merged_manifest(
    new: dict[str, Any], previous: dict[str, Any] | None, retried: int = 0
) -> dict[str, Any]:
    """With --skip_existing the run adds to the table: its manifest describes the whole.
    `retried` inputs were failures of the previous run that this one tried again."""
    if not previous:
        return new
    counts = {
        k: int(previous.get("counts", {}).get(k, 0)) + int(new["counts"][k]) for k in new["counts"]
    }
    counts["failed"] -= retried
    counts["inputs"] -= retried
    files = sorted(set(previous.get("files", [])) | set(new["files"]))
    runs = [*previous.get("runs", [previous.get("run_id")]), new["run_id"]]
    return {**new, "counts": counts, "files": files, "runs": [r for r in runs if r]}


def staged_files(staging: str) -> list[str]:
    """The table files of a finished run: those its staged manifest lists (a part that a
    failed bundle wrote and its retry replaced under another name is not one of them)."""
    manifest = formats.read_manifest(f"{staging}/{formats.MANIFEST_FILE}", formats.KIND_CAPTIONS)
    listed = set(manifest["files"])
    return [f for f in _matches(f"{staging}/*.parquet") if posixpath.basename(f) in listed]


def table_looping(caption_files: list[str]) -> dict[str, Any]:
    """The looping figures (`model.text.ngrams.looping_figures`) of the whole captions table,
    as evaluation reports them: repeated-trigram share, length-limit share, distinct
    captions per image."""
    from model.text.ngrams import looping_figures

    captions: list[str] = []
    at_limit: list[bool] = []
    for path in caption_files:
        table = read_parquet(path, ["caption", "hit_max_length"])
        captions += table["caption"].to_pylist()
        at_limit += table["hit_max_length"].to_pylist()
    return looping_figures(captions, at_limit)


def supersede_retried_errors(staging: str, existing: list[str]) -> int:
    """With --skip_existing, inputs whose row was a transient error were tried again:
    every previous errors file holding such a row is rewritten into `staging` without
    the rows of inputs this run wrote again, and replaces the old file at commit, so
    each input stays in exactly one row. Returns how many rows go."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    transient = pa.array(formats.TRANSIENT_ERRORS)
    old = {f: read_parquet(f) for f in existing if posixpath.basename(f).startswith("errors-")}
    old = {f: t for f, t in old.items() if pc.any(pc.is_in(t["error_type"], transient)).as_py()}
    if not old:
        return 0
    rewritten = pa.chunked_array(
        [read_parquet(f, ["uri"])["uri"].combine_chunks() for f in staged_files(staging)],
        pa.string(),
    )
    dropped = 0
    for path, table in old.items():
        kept = table.filter(pc.invert(pc.is_in(table["uri"], rewritten.combine_chunks())))
        if kept.num_rows == table.num_rows:
            continue
        dropped += table.num_rows - kept.num_rows
        sink = pa.BufferOutputStream()
        pq.write_table(kept, sink, compression=formats.PARQUET_CODEC)
        with FileSystems.create(f"{staging}/{posixpath.basename(path)}") as f:
            f.write(sink.getvalue().to_pybytes())
    return dropped


# Tests set this to a step name to stop a commit right after that step, as a kill would.
FAULT_ENV = "SAT_COMMIT_FAULT"
COMMIT_FILE = "commit.json"


class CommitFault(BaseException):  # noqa: N818 - a stand-in for SIGKILL, not an error
    """Raised by the fault hook: nothing catches it, so the commit stops where it is."""


def _fault(step: str) -> None:
    """The tests' hook: SAT_COMMIT_FAULT=STEP stops the commit after STEP with CommitFault,
    SAT_COMMIT_FAULT=kill:STEP with a real SIGKILL of this process."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted == step:
        raise CommitFault(step)
    if wanted == f"kill:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def commit(
    output_dir: str, staging: str, replaced: list[str], add: bool, retried: int = 0
) -> list[str]:
    """Moves a finished run's files from `staging` into `output_dir`; returns their paths.

    The steps, each safe to be killed after (the next command finishes the commit,
    `finish_commit`): (1) the staged manifest is completed (with --skip_existing,
    `add`, it describes the previous table and this run together) and the plan of the
    commit is written to `staging/commit.json`; (2) the new files move in beside the
    old ones; (3) the manifest moves in, replacing the old one in one rename; (4) the
    files it no longer lists (`replaced`, unless `add`) are deleted, then the staging
    folder. So the table is never empty or half-replaced: a reader that follows the
    manifest sees the old table or the new one; a reader that globs `captions-*` sees
    the old files until (2), both between (2) and (4), and the new ones after.
    """
    out = output_dir.rstrip("/")
    manifest_path = f"{out}/{formats.MANIFEST_FILE}"
    staged_manifest = f"{staging}/{formats.MANIFEST_FILE}"
    final = formats.read_manifest(staged_manifest, formats.KIND_CAPTIONS)
    if add and FileSystems.exists(manifest_path):
        previous = formats.read_manifest(manifest_path, formats.KIND_CAPTIONS)
        final = merged_manifest(final, previous, retried)
        # first: the files it lists are those that move (rewritten error files included)
        formats.write_manifest(staged_manifest, formats.KIND_CAPTIONS, final)
    staged = staged_files(staging)
    where = {posixpath.basename(f): f for f in staged}
    captions = [where.get(n, f"{out}/{n}") for n in final["files"] if n.startswith("captions-")]
    final["looping"] = table_looping(captions)
    formats.write_manifest(staged_manifest, formats.KIND_CAPTIONS, final)
    targets = [f"{out}/{posixpath.basename(f)}" for f in staged]
    listed = set(final["files"])
    plan = {
        "moves": [[s, t] for s, t in zip(staged, targets, strict=True)],
        "manifest": [staged_manifest, manifest_path],
        "delete": [] if add else [f for f in replaced if posixpath.basename(f) not in listed],
    }
    with FileSystems.create(f"{staging}/{COMMIT_FILE}", mime_type="application/json") as f:
        f.write(json.dumps(plan, indent=2).encode())
    _fault("planned")
    finish_commit(staging)
    return targets


def read_commit_plan(staging: str) -> dict[str, Any] | None:
    """The plan of a commit that started in `staging`; None if none did (or it was killed
    while writing the plan, before anything moved)."""
    try:
        with FileSystems.open(f"{staging}/{COMMIT_FILE}", compression_type="uncompressed") as f:
            plan = json.loads(f.read())
    except Exception:  # noqa: BLE001 - missing or half-written: nothing moved yet
        return None
    return plan if isinstance(plan, dict) and "moves" in plan else None


def finish_commit(staging: str) -> None:
    """Carries out (or carries on) the commit planned in `staging/commit.json`: every step
    checks what is already done, so a commit killed anywhere is finished by running this
    again, whatever command does it."""
    plan = read_commit_plan(staging)
    if plan is None:
        raise RuntimeError(f"{staging}: no commit plan")
    moves = [(s, t) for s, t in plan["moves"] if FileSystems.exists(s)]
    if moves:
        FileSystems.rename([s for s, _ in moves], [t for _, t in moves])
    _fault("moved")
    source, target = plan["manifest"]
    if FileSystems.exists(source):
        FileSystems.rename([source], [target])  # replaces the old manifest in one step
    _fault("manifest")
    old = [f for f in plan["delete"] if FileSystems.exists(f)]
    if old:
        FileSystems.delete(old)
    _fault("deleted")
    FileSystems.delete([staging])
