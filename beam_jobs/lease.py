"""One writer per output folder: a job holds a lease on its --output_dir while it runs.

Two runs on one CAPTIONS_DIR (or FEATURES_DIR) would each take the other's live
staging folder for a killed run's and delete it, and commit over each other. A
local output folder is leased with an flock on `OUTPUT_DIR/.lock`, which the
kernel releases when the process ends, even by SIGKILL, so a killed run never
leaves a stale lease behind; the file names the holder (pid, host, start time)
for the one-line refusal a second run prints.

Object stores have no locks. A lease there needs an object created only if
absent (GCS's `ifGenerationMatch=0`) with a heartbeat; the GCS emulator the
tests run does not implement preconditions, so that is not done yet: on gs://
the lease is the team's convention, as before (docs: one job per output prefix).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from model.cli import UsageError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def output_lease(output_dir: str, job: str) -> Iterator[None]:
    """Holds the lease on a local `output_dir` for the block; a held one is refused."""
    if "://" in output_dir:
        yield
        return
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
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"{job} (pid {os.getpid()} on {socket.gethostname()}, {started})".encode())
        yield
    finally:
        os.close(fd)  # releases the flock
