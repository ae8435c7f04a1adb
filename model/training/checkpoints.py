"""Checkpoints and resume: MODEL_DIR's lock, the step-level checkpoints, the best epoch's weights.

The chief writes MODEL_DIR/checkpoints (the last 3); every worker restores the
newest one that reads back whole, so all resume at one step. The best epoch's weights
are variables of the checkpoint (`BestWeights`): every worker keeps its own copy,
updated by the same shared decision, so the self-critical stage and the export start
from them without reading a file another worker writes.
"""

from __future__ import annotations

import os
import sys

import keras
import tensorflow as tf

from model.cli import first_line
from model.io import formats

BEST_WEIGHTS_FILE = "best.weights.h5"  # what runs before 2026-12 kept the best epoch in


def checkpoint_manager(
    ckpt: tf.train.Checkpoint, model_dir: str, chief: bool, task: int
) -> tf.train.CheckpointManager:
    """The chief writes MODEL_DIR/checkpoints; every worker must save too, into scratch."""
    if chief:
        return tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "checkpoints"), 3)
    scratch = os.path.join(model_dir, "tmp", f"worker-{task}")
    return tf.train.CheckpointManager(ckpt, scratch, max_to_keep=1)


_LOCKS: dict[str, int] = {}  # model dir -> open file descriptor holding its lock


def lock_model_dir(model_dir: str) -> None:
    """Stops a second trainer on the same local MODEL_DIR with one line. The lock is an
    flock on MODEL_DIR/.lock, which the kernel releases when the process ends, even by
    SIGKILL, so a killed run never leaves a stale lock. (Object stores have no locks.)"""
    if "://" in model_dir or model_dir in _LOCKS:
        return
    import fcntl

    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise formats.FormatError(
            f"{model_dir} is in use by another trainer (pid {holder}); "
            "wait for it or use another --model_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[model_dir] = fd


def checkpoints_newest_first(ckpt_dir: str) -> list[str]:
    """Every checkpoint prefix in `ckpt_dir`, newest (highest step) first, found from the
    files themselves: a garbled `checkpoint` index must not hide them."""
    found = []
    for index in tf.io.gfile.glob(os.path.join(ckpt_dir, "ckpt-*.index")):
        prefix = index[: -len(".index")]
        number = prefix.rsplit("-", 1)[-1]
        if number.isdigit():
            found.append((int(number), prefix))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def restore_newest_readable(ckpt: tf.train.Checkpoint, ckpt_dir: str) -> str | None:
    """Restores the newest checkpoint that reads back whole; warns for each one skipped.
    None when there is none; one-line error when there are some but none is readable."""
    candidates = checkpoints_newest_first(ckpt_dir)
    for prefix in candidates:
        try:
            ckpt.restore(prefix).expect_partial()
            return prefix
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (IndexError, DataLoss, ...)
            print(
                f"train: warning: checkpoint {prefix} is unreadable ({type(e).__name__}: "
                f"{first_line(e)}); trying the one before it",
                file=sys.stderr,
                flush=True,
            )
    if candidates:
        raise formats.FormatError(
            f"{ckpt_dir}: none of {len(candidates)} checkpoints is readable; "
            "delete the folder to start over"
        )
    return None


class BestWeights:
    """A copy of the model's weights as they were at the best epoch so far, on the host.

    Part of the checkpoint (`kept` says whether it holds an epoch yet). Every worker
    copies its own weights at the same shared decision, and replicas hold the same
    weights, so every worker's copy is the same without a file or a barrier."""

    def __init__(self, model: keras.Model):
        self._model = model
        with tf.device("/cpu:0"):
            self.values = [tf.Variable(w.value, trainable=False) for w in _weights(model)]
            self.kept = tf.Variable(False)

    def checkpointed(self) -> dict[str, object]:
        """What `tf.train.Checkpoint` saves of it."""
        return {"best_weights": self.values, "best_kept": self.kept}

    def keep(self) -> None:
        for mine, w in zip(self.values, _weights(self._model), strict=True):
            mine.assign(w.value)
        self.kept.assign(True)

    def load_into_model(self) -> bool:
        """Sets the model's weights to the best epoch's; False when none is kept."""
        if not bool(self.kept.numpy()):
            return False
        for mine, w in zip(self.values, _weights(self._model), strict=True):
            w.assign(mine)
        return True

    def adopt_file(self, model_dir: str) -> None:
        """A checkpoint of a run before 2026-12 kept the best epoch in a file beside it."""
        path = os.path.join(model_dir, BEST_WEIGHTS_FILE)
        if bool(self.kept.numpy()) or not tf.io.gfile.exists(path):
            return
        now = [w.numpy() for w in _weights(self._model)]
        self._model.load_weights(path)
        self.keep()
        for w, value in zip(_weights(self._model), now, strict=True):
            w.assign(value)


def _weights(model: keras.Model) -> list[keras.Variable]:
    return list(model.weights)
