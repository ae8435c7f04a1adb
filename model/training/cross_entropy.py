"""The cross-entropy epochs (teacher forcing): train on every caption pair once, then validate.

`train_epoch` runs the rest of the current epoch from its checkpointed position,
`--steps_per_execution` steps per compiled call, checkpointing every
`--checkpoint_every` steps; `end_epoch` validates, selects and records the epoch.
"""

from __future__ import annotations

import time
from typing import Any

import keras
import tensorflow as tf

from model.data.shards import SplitInfo
from model.io import formats
from model.training.run import Run
from model.training.selection import LOSS_KEYS, close_epoch, judge, validation
from model.training.steps import ZERO, Totals, run_steps


def train_epoch(run: Run) -> Totals:
    """Runs the rest of the current epoch; checkpoints every --checkpoint_every steps."""
    args, e = run.args, run.var("epoch")
    iterator = run.distributed(
        run.train_info, shuffle=True, seed=args.seed * 1000 + e, skip=run.var("position")
    )
    bar = keras.utils.Progbar(
        run.steps_per_epoch,
        verbose=int(args.verbose == 1),
        stateful_metrics=["loss", "ce", "pairs/s"],
    )
    totals = Totals(*run.state["epoch_sums"].numpy().tolist()[:4], int(run.state["epoch_sums"][4]))
    started, pairs = time.perf_counter(), 0.0
    while True:
        until_ckpt = args.checkpoint_every - run.var("step") % args.checkpoint_every
        chunk = run_steps(run.fns.train, iterator, min(args.steps_per_execution, until_ckpt))
        if chunk.steps == 0:
            break
        totals += chunk
        pairs += chunk.pairs
        for name in ("step", "position"):
            run.state[name].assign_add(chunk.steps)
        run.state["epoch_sums"].assign([*totals[:4], totals.steps])
        rate = pairs / (time.perf_counter() - started)
        bar.update(
            min(run.var("position"), run.steps_per_epoch),
            [("loss", totals.loss), ("ce", totals.ce), ("pairs/s", rate)],
        )
        if run.chief:
            with run.writer.as_default(step=run.var("step")):
                tf.summary.scalar("train/loss", chunk.loss)
                tf.summary.scalar("train/cross_entropy", chunk.ce)
                tf.summary.scalar("train/learning_rate", run.optimizer.learning_rate)
                tf.summary.scalar("train/pairs_per_second", rate)
        if run.var("step") % args.checkpoint_every == 0:
            run.manager.save(checkpoint_number=run.var("step"))
        if chunk.steps < min(args.steps_per_execution, until_ckpt):
            break  # the data ended inside this call
    return totals


def check_epoch_pairs(run: Run, totals: Totals) -> None:
    """A whole epoch reads every caption pair of the split once (less a dropped last
    batch): other counts mean the shards are not what the manifest says they are."""
    expected = run.train_info.captions
    if not expected - run.global_batch < totals.pairs <= expected:
        raise formats.FormatError(
            f"{run.args.data_dir}: the shards of split {run.args.train_split!r} hold "
            f"{int(totals.pairs)} caption pairs, the manifest says {expected}: they do not "
            "belong together; re-extract the split"
        )


def end_epoch(run: Run, totals: Totals) -> None:
    """Validation, selection and early stopping (decided once for all workers), the
    epoch's record and a checkpoint."""
    check_epoch_pairs(run, totals)
    args, e = run.args, run.var("epoch")
    record: dict[str, Any] = {
        "epoch": e + 1,
        "loss": totals.loss,
        "ce": totals.ce,
        "pairs": int(totals.pairs),
        "step": run.var("step"),
    }
    if run.val_info is not None:
        val = evaluate_split(run, run.val_info)
        record.update(validation(run, (val.loss, val.ce)))
        # best_val holds the selection metric as a loss: lower is better.
        cider = args.select_by == "cider"
        judge(run, record, -record["val_cider"] if cider else record["val_loss"])
    close_epoch(run, record, "epoch", "epoch_sums", LOSS_KEYS, "epoch")
    if args.verbose:
        print(
            f"train: epoch {e + 1}/{args.epochs} step {run.var('step')} "
            + " ".join(f"{k} {record[k]:.4f}" for k in LOSS_KEYS if k in record)
            + (" (early stop)" if run.stopped_early else ""),
            flush=True,
        )


def evaluate_split(run: Run, info: SplitInfo) -> Totals:
    """Loss and cross-entropy per real token over a whole split."""
    iterator = run.distributed(info, shuffle=False)
    totals = ZERO
    while True:
        chunk = run_steps(run.fns.evaluate, iterator, 1000)
        totals += chunk
        if chunk.steps < 1000:
            return totals
