"""One writer per output folder: a job holds a lease on its --output_dir while it runs.

Two runs on one CAPTIONS_DIR (or FEATURES_DIR) would each take the other's live
staging folder for a killed run's and delete it, and commit over each other.

- **Local folders**: an flock on `OUTPUT_DIR/.lock`, which the kernel releases when the
  process ends, even by SIGKILL, so a killed run never leaves a stale lease behind. The
  file names the holder (pid, host, start time) for the one-line refusal.
- **gs://**: object stores have no locks, but GCS creates an object only if absent
  (`ifGenerationMatch=0`) and replaces it only if unchanged (`ifGenerationMatch=N`),
  atomically. The lease is the object `OUTPUT_DIR/.lease` (JSON: holder, start, and a
  heartbeat time), created only if absent. A thread rewrites it every
  `TTL / 4` seconds, each time conditioned on the generation it last wrote, so a lease
  lost to another run is noticed at the next beat. A second run refuses in one line
  naming the holder; a lease whose heartbeat is older than the TTL (its run was killed)
  is taken over, conditioned on the stale generation, with a message. Before a run
  commits, `Lease.confirm()` checks that the lease is still its own. The time compared
  is the store's own `updated` time of the object against the reader's clock, so hosts
  need roughly synchronised clocks (NTP); the TTL (120 s) leaves room.
- Other schemes (s3://, ...): no lease, as before (one job per output prefix).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.paths import is_local
from model.cli import UsageError

LOCK_FILE = ".lock"
LEASE_OBJECT = ".lease"
TTL_SECONDS = float(os.environ.get("SAT_LEASE_TTL", "120"))


def holder_text(job: str) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"{job} (pid {os.getpid()} on {socket.gethostname()}, {started})"


@dataclass
class Lease:
    """A held lease. `confirm()` raises if it was lost (gs:// only: a local flock
    cannot be lost while the process lives)."""

    output_dir: str
    lost: str | None = None  # who took it, once the heartbeat finds out
    stop: threading.Event = field(default_factory=threading.Event)

    def confirm(self) -> None:
        if self.lost:
            raise RuntimeError(
                f"lost the lease on {self.output_dir} to {self.lost} (this run's heartbeat "
                "stopped for longer than the lease's TTL); not committing over its work"
            )


@contextlib.contextmanager
def output_lease(output_dir: str, job: str) -> Iterator[Lease]:
    """Holds the lease on `output_dir` for the block; a held one is refused in one line."""
    if FileSystems.get_scheme(output_dir) == "gs":
        with _gcs_lease(output_dir, job) as lease:
            yield lease
        return
    if not is_local(output_dir):
        yield Lease(output_dir)
        return
    with _local_lease(output_dir, job) as lease:
        yield lease


@contextlib.contextmanager
def _local_lease(output_dir: str, job: str) -> Iterator[Lease]:
    import fcntl

    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise UsageError(
                f"{output_dir} is in use by {holder}; wait for it to finish or use "
                "another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, holder_text(job).encode())
        yield Lease(output_dir)
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- gs://


def _blob(output_dir: str) -> Any:
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    bucket, prefix = parse_gcs_path(f"{output_dir.rstrip('/')}/{LEASE_OBJECT}")
    return GcsIO().client.bucket(bucket).blob(prefix)


def _body(holder: str, run_id: str) -> str:
    return json.dumps({"holder": holder, "run_id": run_id, "heartbeat": time.time()})


def _read(blob: Any) -> tuple[dict[str, Any], int, float] | None:
    """(lease body, generation, seconds since the store last updated it); None if absent."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    try:
        blob.reload()
        generation, updated = int(blob.generation), blob.updated
        body = json.loads(blob.download_as_bytes(if_generation_match=generation))
    except (NotFound, PreconditionFailed):  # gone or replaced while read: look again
        return None
    except ValueError:
        body = {"holder": "an unreadable lease"}
    age = (datetime.datetime.now(datetime.UTC) - updated).total_seconds()
    return body, generation, age


def _acquire(blob: Any, holder: str, run_id: str, output_dir: str) -> int:
    """Creates the lease object (or takes over a stale one); returns its generation."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    for _ in range(5):  # another run may win each race; then it holds the lease
        try:
            blob.upload_from_string(_body(holder, run_id), if_generation_match=0)
            return int(blob.generation)
        except PreconditionFailed:
            pass
        found = _read(blob)
        if found is None:
            continue  # released meanwhile: try again
        body, generation, age = found
        if age <= TTL_SECONDS:
            raise UsageError(
                f"{output_dir} is in use by {body.get('holder', 'another run')} "
                f"(lease {LEASE_OBJECT}, heartbeat {age:.0f}s ago); wait for it to finish "
                "or use another --output_dir"
            )
        try:
            blob.upload_from_string(_body(holder, run_id), if_generation_match=generation)
        except (PreconditionFailed, NotFound):
            continue  # someone else took it over first
        print(
            f"lease: took over {output_dir} from {body.get('holder', '?')}, whose heartbeat "
            f"stopped {age:.0f}s ago (its run was killed)",
            flush=True,
        )
        return int(blob.generation)
    raise UsageError(f"{output_dir}: could not take the lease; another run keeps racing for it")


def _heartbeat(blob: Any, lease: Lease, holder: str, run_id: str, generation: int) -> None:
    from google.api_core.exceptions import GoogleAPICallError, NotFound, PreconditionFailed

    while not lease.stop.wait(TTL_SECONDS / 4):
        try:
            blob.upload_from_string(_body(holder, run_id), if_generation_match=generation)
            generation = int(blob.generation)
        except (PreconditionFailed, NotFound):
            found = _read(blob)
            lease.lost = found[0].get("holder", "another run") if found else "a deleted lease"
            return
        except GoogleAPICallError:
            continue  # a transient error: the next beat tries again, well within the TTL
    lease.generation = generation  # type: ignore[attr-defined]


@contextlib.contextmanager
def _gcs_lease(output_dir: str, job: str) -> Iterator[Lease]:
    from google.api_core.exceptions import GoogleAPICallError

    blob = _blob(output_dir)
    holder, run_id = holder_text(job), uuid.uuid4().hex
    generation = _acquire(blob, holder, run_id, output_dir)
    lease = Lease(output_dir)
    beat = threading.Thread(
        target=_heartbeat, args=(blob, lease, holder, run_id, generation), daemon=True
    )
    beat.start()
    try:
        yield lease
    finally:
        lease.stop.set()
        beat.join()
        if not lease.lost:
            with contextlib.suppress(GoogleAPICallError):  # it expires by itself anyway
                blob.delete(if_generation_match=getattr(lease, "generation", generation))
