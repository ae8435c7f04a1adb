"""The training loop behind `python -m model.train` (see that module for the command).

run = set_up(args)                      # model.training.run: data, strategy, model, resume
while not run.ce_done:                  # model.training.cross_entropy
    end_epoch(run, train_epoch(run))    #   train, validate, select, checkpoint
critic = self_critical.start(run)       # model.training.self_critical (--scst_epochs)
while not run.done:
    self_critical.end_epoch(run, self_critical.epoch(run, critic))
finish(run)                             # model.training.selection: the best epoch, export
"""

from __future__ import annotations

import argparse
from typing import Any

from model.io import formats
from model.training import self_critical
from model.training.cross_entropy import end_epoch, train_epoch
from model.training.run import set_up
from model.training.selection import finish


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains to `args.epochs` (resuming from MODEL_DIR/checkpoints) and exports."""
    run = set_up(args)
    print(
        f"train: {run.train_info.images} images, {run.train_info.captions} captions, "
        f"{run.steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch "
        f"{run.global_batch} on {run.strategy.num_replicas_in_sync} replica(s), "
        f"policy {run.policy}, model {run.model.config.to_dict()}",
        flush=True,
    )
    if run.var("scst_epoch") and not run.ce_done:
        raise formats.FormatError(
            f"{args.model_dir} has run {run.var('scst_epoch')} self-critical epoch(s) after "
            f"{run.var('epoch')} cross-entropy ones: more --epochs cannot follow them "
            f"(keep --epochs {run.var('epoch')}, or use a new --model_dir)"
        )
    while not run.ce_done:
        end_epoch(run, train_epoch(run))
    if not run.done:
        critic = self_critical.start(run)
        while not run.done:
            self_critical.end_epoch(run, self_critical.epoch(run, critic))
    run.writer.flush()
    return finish(run, self_critical.summary(run))
