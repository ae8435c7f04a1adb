"""One training run's state and its set-up: data, strategy, model, optimizers, checkpoint.

`set_up(args)` reads FEATURES_DIR, pins the run's configuration (`config`), builds
the model and optimizers under the strategy, and restores the newest checkpoint
(`checkpoints`); `Run` holds all of it and the counters the loop advances.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from model.data.shards import SplitInfo, caption_pairs, check_data_dir, feature_stats, split_info
from model.network.captioner import ShowAttendTell
from model.text.vocab import Vocabulary
from model.training import cluster
from model.training.checkpoints import (
    BestWeights,
    checkpoint_manager,
    lock_model_dir,
    restore_newest_readable,
)
from model.training.config import (
    check_run_config,
    data_identity,
    lr_schedule,
    model_config,
    precision_policy,
    training_flags,
)
from model.training.steps import DynamicLossScale, StepFns, make_step_fns

XLA_LENGTH_MULTIPLE = 4  # with --jit_compile, caption lengths are padded to buckets of 4


@dataclass(kw_only=True)
class Run:
    """Everything one training run holds: data, strategy, model, optimizer, counters."""

    args: argparse.Namespace
    features_manifest: dict[str, Any]
    vocab: Vocabulary
    train_info: SplitInfo
    val_info: SplitInfo | None
    strategy: tf.distribute.Strategy
    chief: bool
    policy: str
    global_batch: int
    steps_per_epoch: int
    model: ShowAttendTell
    optimizer: keras.optimizers.Optimizer
    fns: StepFns
    state: dict[str, tf.Variable]  # step, epoch, position, best_val, bad_epochs, ...
    best: BestWeights
    manager: tf.train.CheckpointManager
    writer: Any
    scst_optimizer: keras.optimizers.Optimizer | None = None  # --scst_epochs: constant rate
    cache: dict[str, Any]  # built once when first needed: val decoder, val references, ...

    def var(self, name: str) -> int:
        return int(self.state[name].numpy())

    @property
    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.state["history"].numpy().decode())

    @property
    def stopped_early(self) -> bool:
        return bool(self.args.patience and self.var("bad_epochs") >= self.args.patience)

    @property
    def ce_done(self) -> bool:
        return self.var("epoch") >= self.args.epochs or self.stopped_early

    @property
    def done(self) -> bool:
        return self.ce_done and self.var("scst_epoch") >= self.args.scst_epochs

    def batches(self, shuffle: bool, seed: int = 0) -> Any:
        """(files, batch size) -> caption-pair batches in an order fixed by `seed`."""

        def make(files: list[str], batch_size: int) -> tf.data.Dataset:
            return caption_pairs(
                files,
                self.vocab,
                batch_size,
                shuffle=shuffle,
                seed=seed,
                max_tokens=self.args.max_tokens,
                pair_buffer=self.args.shuffle_buffer,
                length_multiple=XLA_LENGTH_MULTIPLE if self.args.jit_compile else 1,
            )

        return make

    def distributed(self, info: SplitInfo, shuffle: bool, seed: int = 0, skip: int = 0) -> Any:
        """An iterator over `info`'s caption pairs, each worker its share, `skip` steps in."""
        return iter(
            cluster.distribute_batches(
                self.strategy,
                self.batches(shuffle, seed),
                info.files,
                self.global_batch,
                self.args.shard_policy,
                skip,
            )
        )


def set_up(args: argparse.Namespace) -> Run:
    """Reads the data dir, builds strategy, model and optimizer, restores the latest checkpoint."""
    features_manifest, vocab = check_data_dir(args.data_dir)
    train_info = split_info(args.data_dir, features_manifest, args.train_split)
    has_val = args.val_split in features_manifest.get("splits", {})
    val_info = split_info(args.data_dir, features_manifest, args.val_split) if has_val else None

    strategy, chief = cluster.choose_strategy()
    if chief:
        lock_model_dir(args.model_dir)
    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size or (args.per_replica_batch_size or 0) * replicas or 64
    policy = precision_policy(args.mixed_precision)
    config = model_config(args, len(vocab))
    training = training_flags(args, global_batch, policy)
    data = data_identity(features_manifest, vocab)
    record = check_run_config(args.model_dir, config, training, chief, data, args.epochs)
    # The schedule spans the epochs of the first run: a resume with more --epochs keeps
    # the rate continuous and trains the extra epochs at the schedule's final rate.
    schedule_epochs = (record.get("schedule") or {}).get("epochs") or args.epochs
    if schedule_epochs != args.epochs and chief:
        print(
            f"train: the learning-rate schedule spans the first run's {schedule_epochs} "
            f"epochs; epochs past them train at its final rate",
            flush=True,
        )
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(args.seed)
    steps_per_epoch = max(1, math.ceil(train_info.captions / global_batch))

    with strategy.scope():
        model = ShowAttendTell(**config, name="show_attend_tell")
        schedule = lr_schedule(
            args.learning_rate, args.warmup_steps, steps_per_epoch * schedule_epochs, args.decay
        )
        optimizer = keras.optimizers.Adam(schedule)  # clipping happens after the all-reduce
        optimizer.build(model.trainable_variables)
        scst_optimizer = None
        if args.scst_epochs:
            scst_optimizer = keras.optimizers.Adam(args.scst_learning_rate)
            scst_optimizer.build(model.trainable_variables)
    loss_scale = DynamicLossScale() if policy == "mixed_float16" else None
    state = {
        "step": tf.Variable(0, dtype=tf.int64, name="step"),
        "epoch": tf.Variable(0, dtype=tf.int64, name="epoch"),
        "position": tf.Variable(0, dtype=tf.int64, name="position"),  # steps done this epoch
        "epoch_sums": tf.Variable(tf.zeros([5], tf.float64), name="epoch_sums"),  # Totals so far
        "best_val": tf.Variable(float("inf"), dtype=tf.float64, name="best_val"),
        "bad_epochs": tf.Variable(0, dtype=tf.int64, name="bad_epochs"),
        "history": tf.Variable("[]", dtype=tf.string, name="history"),  # JSON, all epochs
        "scst_epoch": tf.Variable(0, dtype=tf.int64, name="scst_epoch"),
        # This self-critical epoch's sums so far: reward, baseline, samples.
        "scst_sums": tf.Variable(tf.zeros([3], tf.float64), name="scst_sums"),
    }
    if loss_scale is not None:
        state.update(loss_scale=loss_scale.scale, good_steps=loss_scale.good_steps)
    best = BestWeights(model)
    # Dropout's random state: Keras keeps it out of the model's checkpoint, and without it
    # a resumed run draws other masks than the run it continues.
    seeds = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    extra = {"scst_optimizer": scst_optimizer} if scst_optimizer is not None else {}
    ckpt = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        dropout_seeds=seeds,
        **best.checkpointed(),
        **extra,
        **state,
    )
    task = cluster.task_id(strategy)
    manager = checkpoint_manager(ckpt, args.model_dir, chief, task)
    fns = make_step_fns(
        strategy,
        model,
        optimizer,
        args.attention_penalty,
        clip_norm=args.clip_norm,
        loss_scale=loss_scale,
        jit_compile=args.jit_compile,
    )
    logs = os.path.join(args.model_dir, "logs" if chief else f"tmp/logs-{task}")
    run = Run(
        args=args,
        features_manifest=features_manifest,
        vocab=vocab,
        train_info=train_info,
        val_info=val_info,
        strategy=strategy,
        chief=chief,
        policy=policy,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        model=model,
        optimizer=optimizer,
        fns=fns,
        state=state,
        best=best,
        manager=manager,
        writer=tf.summary.create_file_writer(logs),
        scst_optimizer=scst_optimizer,
        cache={},
    )
    restore_or_initialise(run, ckpt)
    return run


def restore_or_initialise(run: Run, ckpt: tf.train.Checkpoint) -> None:
    """Every worker restores the chief's latest readable checkpoint, so all resume at one
    position (they see the same files and make the same choice)."""
    latest = restore_newest_readable(ckpt, os.path.join(run.args.model_dir, "checkpoints"))
    if latest:  # the checkpoint also restores the feature statistics
        run.best.adopt_file(run.args.model_dir)
        print(
            f"train: resumed from {latest} at step {run.var('step')} "
            f"(epoch {run.var('epoch') + 1}, batch {run.var('position')})",
            flush=True,
        )
    elif run.model.config.normalize_features:
        mean, variance = feature_stats(run.train_info.files)
        run.model.encoder.set_feature_stats(mean, variance)
