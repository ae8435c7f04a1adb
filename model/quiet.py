"""TensorFlow imported without its start-up chatter.

On a machine without a GPU, `import tensorflow` and the first device listing
print five or so lines through absl before absl is configured, so neither
TF_CPP_MIN_LOG_LEVEL nor Python logging can stop them, one of them at error
level (`failed call to cuInit`). They are expected and say nothing a user can
act on, so `import_tensorflow` runs those two steps with file descriptor 2
sent to a temporary file and replays every line except the known ones.
Anything else TensorFlow prints at start (a broken CUDA install, say) still
reaches the terminal; `--verbose` shows everything. `filtered_stderr` also
keeps the COCO metrics' Java tokenizer from reporting each run.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

# The known start-up lines of TensorFlow 2.x on CPU-only machines.
STARTUP_NOISE = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called",
            r"cudart_stub\.cc.*Could not find cuda drivers",
            r"cuda_platform\.cc.*failed call to cuInit",
            r"cuda_(dnn|fft|blas)\.cc.*Unable to register",
            r"computation_placer\.cc.*already registered",
            r"cpu_feature_guard\.cc",
            r"To enable the following instructions: .*rebuild TensorFlow",
            r"oneDNN custom operations are on",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"TF-TRT Warning: Could not find TensorRT",
            # At the first integer op on x86 CPUs without AVX-512 (any vendor), at error
            # level though nothing is wrong: Eigen computes it instead.
            r"oneDNN supports DT_\w+ only on platforms with",
        ]
    )
)


# What the worker processes of Beam's multi_processing runner print besides TensorFlow's
# start-up lines: two warnings per process about features of Dataflow's workers.
WORKER_NOISE = re.compile(
    STARTUP_NOISE.pattern
    + r"|No semi_persistent_directory found"
    + r"|Resource module is not available for current platform"
)


def drop_noise(text: str, noise: re.Pattern[str] = STARTUP_NOISE) -> str:
    """`text` without the lines `noise` matches."""
    return "".join(line for line in text.splitlines(keepends=True) if not noise.search(line))


# The Stanford PTB tokenizer (pycocoevalcap, a Java subprocess) reports each run.
PTB_TOKENIZER_NOTICE = re.compile(r"^PTBTokenizer tokenized \d+ tokens at ")


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str] = STARTUP_NOISE) -> Iterator[None]:
    """Sends file descriptor 2 (C++ logs and child processes included) to a temporary
    file, then replays it without the lines `noise` matches, even if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = drop_noise(captured.read().decode(errors="replace"), noise)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


@contextlib.contextmanager
def filtered_stream(noise: re.Pattern[str] = WORKER_NOISE) -> Iterator[None]:
    """While the block runs, file descriptor 2 (C++ logs and every child process started
    meanwhile, Beam's worker processes included) goes through a pipe; a thread passes
    each line on as it comes (a progress line redrawn with \\r too), except those `noise`
    matches. Children still running afterwards keep being filtered until they exit."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def keep(line: bytes) -> bool:
        return not noise.search(line.decode(errors="replace"))

    def pump() -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 1 << 16):
                *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
                if out := b"".join(line for line in lines if keep(line)):
                    os.write(terminal, out)
            if pending and keep(pending):
                os.write(terminal, pending)
        finally:
            os.close(read_end)
            os.close(terminal)

    thread = threading.Thread(target=pump, name="filtered-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        restore = os.dup(terminal)
        os.dup2(restore, 2)
        os.close(restore)
        thread.join(timeout=5)  # everything written so far, unless a child lingers


def import_tensorflow(verbose: bool = False) -> ModuleType:
    """Imports TensorFlow and lists its devices; quietly unless `verbose`.

    Quiet also means TF_CPP_MIN_LOG_LEVEL=2 (errors only) when the user has not
    set it, which keeps run-time notices such as the end-of-sequence line each
    epoch prints off the terminal.
    """
    if verbose:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
