"""Stage 2: trains Show-Attend-Tell on the feature shards with tf.distribute, then exports it.

    python -m model.train --data_dir FEATURES_DIR --model_dir MODEL_DIR [--epochs N] [--preset tiny]

MirroredStrategy over the local GPUs (or the CPU), MultiWorkerMirroredStrategy
when TF_CONFIG names several workers. A custom loop (`strategy.run`) serves
both. Step-level checkpoints in MODEL_DIR/checkpoints: killing the process and
running the same command again continues where it stopped. The model, its
vocabulary and a manifest go to MODEL_DIR/export/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from model import formats
from model.captioner import PRESETS, LossParts, ShowAttendTell, combine_loss, loss_parts
from model.cli import run_cli
from model.data import caption_pairs, check_data_dir, feature_stats, split_info
from model.export import DEFAULT_MAX_LENGTH, save_export
from model.vocab import PAD_ID

# Per real token: the trained objective (cross-entropy + attention penalty) and
# the cross-entropy alone (its exp is perplexity), on train and val.
LOSS_KEYS = ("loss", "ce", "val_loss", "val_ce")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="FEATURES_DIR written by extract_features")
    p.add_argument("--model_dir", required=True, help="checkpoints, logs and export/ go here")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64, help="global batch (all replicas)")
    p.add_argument("--preset", default="tutorial", choices=sorted(PRESETS), help="model size")
    p.add_argument("--embedding_dim", type=int, help="overrides the preset")
    p.add_argument("--units", type=int, help="overrides the preset")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attention_penalty", type=float, default=1.0, help="lambda; 0 turns it off")
    p.add_argument(
        "--no_feature_norm",
        action="store_true",
        help="feed raw features (no per-channel standardisation)",
    )
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--decay", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--clip_norm", type=float, default=5.0, help="global gradient norm clip")
    p.add_argument("--mixed_precision", action="store_true", help="float16 on GPU, bfloat16 on CPU")
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile the training step")
    p.add_argument("--checkpoint_every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--patience", type=int, default=3, help="early stopping on val loss (0: off)")
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default="val", help="validation split, if present")
    p.add_argument("--max_tokens", type=int, default=40, help="truncate training captions")
    p.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="decoding limit")
    p.add_argument("--shuffle_buffer", type=int, default=2048, help="pairs in the shuffle buffer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--verbose",
        type=int,
        default=None,
        help="0 quiet, 1 progress bar, 2 line per epoch (default: 1 on a terminal, else 2)",
    )
    args = p.parse_args(argv)
    if args.verbose is None:  # a progress bar only where \r redraws it; logs get lines
        args.verbose = 1 if sys.stdout.isatty() else 2
    return args


def choose_strategy() -> tf.distribute.Strategy:
    """MultiWorker when TF_CONFIG lists more than one task, else Mirrored over local devices."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    workers = sum(
        len(v) for k, v in tf_config.get("cluster", {}).items() if k in ("worker", "chief")
    )
    if workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([d.name for d in gpus] or ["/cpu:0"])


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to 10% of it (or constant)."""

    def __init__(self, peak: float, warmup: int, total: int, decay: str = "cosine"):
        self.peak, self.warmup, self.total, self.decay = peak, warmup, max(total, 1), decay

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / max(self.warmup, 1))
        if self.decay == "constant":
            return warm
        progress = tf.clip_by_value(
            (step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0
        )
        cosine = self.peak * (0.1 + 0.9 * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        return tf.where(step < self.warmup, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "decay": self.decay}


@dataclass
class StepFns:
    train: Any
    evaluate: Any


def make_step_fns(
    strategy: tf.distribute.Strategy,
    model: ShowAttendTell,
    optimizer: keras.optimizers.Optimizer,
    attention_penalty: float,
    jit_compile: bool = False,
) -> StepFns:
    """Distributed train and eval steps.

    Each replica divides its summed loss by the *global* number of real tokens
    (an all-reduce), and the optimizer sums gradients over replicas, so N
    replicas compute the same loss and update as one device on the whole batch.
    """

    def forward(
        features: tf.Tensor, tokens: tf.Tensor, training: bool
    ) -> tuple[tf.Tensor, LossParts]:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        local_tokens = tf.reduce_sum(tf.cast(tf.not_equal(targets, PAD_ID), tf.float32))
        ctx = tf.distribute.get_replica_context()
        global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
        logits, alphas = model((features, inputs), training=training)
        parts = loss_parts(logits, alphas, targets)
        return combine_loss(parts, attention_penalty, global_tokens), parts

    def replica_train(features: tf.Tensor, tokens: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape() as tape:
            loss, parts = forward(features, tokens, training=True)
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss, parts.tokens, parts.cross_entropy

    def replica_eval(features: tf.Tensor, tokens: tf.Tensor) -> tuple[tf.Tensor, ...]:
        _, parts = forward(features, tokens, training=False)
        total = parts.cross_entropy + attention_penalty * parts.penalty
        return total, parts.tokens, parts.cross_entropy

    def reduce(values: tuple) -> tuple[tf.Tensor, ...]:
        return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values)

    # XLA compiles the per-replica body; the distribution wrapper stays a plain graph.
    replica_step = tf.function(replica_train, jit_compile=True) if jit_compile else replica_train

    @tf.function
    def train(batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, ...]:
        """-> (loss, real tokens, summed cross-entropy) over all replicas."""
        return reduce(strategy.run(replica_step, args=batch))

    @tf.function
    def evaluate(batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, ...]:
        """-> (summed loss, real tokens, summed cross-entropy) over all replicas."""
        return reduce(strategy.run(replica_eval, args=batch))

    return StepFns(train, evaluate)


def model_config(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    return {
        "vocab_size": vocab_size,
        "embedding_dim": args.embedding_dim or preset["embedding_dim"],
        "units": args.units or preset["units"],
        "dropout": args.dropout,
        "attention_penalty": args.attention_penalty,
        "normalize_features": not args.no_feature_norm,
    }


def check_checkpoint_config(model_dir: str, config: dict[str, Any]) -> None:
    """A checkpoint from a different model/vocabulary fails at start with one line."""
    path = os.path.join(model_dir, "config.json")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if diff:
            raise formats.FormatError(
                f"{model_dir} holds a checkpoint of another model: "
                + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items())
                + " (use a new --model_dir)"
            )
    else:
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(config, f, indent=2)


def set_precision(mixed: bool) -> str:
    if not mixed:
        policy = "float32"
    else:
        policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains to `args.epochs` (resuming from MODEL_DIR/checkpoints) and exports."""
    features_manifest, vocab = check_data_dir(args.data_dir)
    train_info = split_info(args.data_dir, features_manifest, args.train_split)
    has_val = args.val_split in features_manifest.get("splits", {})
    val_info = split_info(args.data_dir, features_manifest, args.val_split) if has_val else None
    config = model_config(args, len(vocab))
    check_checkpoint_config(args.model_dir, config)

    strategy = choose_strategy()
    chief = is_chief(strategy)
    policy = set_precision(args.mixed_precision)
    replicas = strategy.num_replicas_in_sync
    steps_per_epoch = max(1, math.ceil(train_info.captions / args.batch_size))
    total_steps = steps_per_epoch * args.epochs
    keras.utils.set_random_seed(args.seed)

    with strategy.scope():
        model = ShowAttendTell(**config, name="show_attend_tell")
        schedule = WarmupDecay(args.learning_rate, args.warmup_steps, total_steps, args.decay)
        optimizer: keras.optimizers.Optimizer = keras.optimizers.Adam(
            schedule, global_clipnorm=args.clip_norm or None
        )
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    # Loop counters live outside the strategy: plain variables, updated eagerly by every worker.
    step = tf.Variable(0, dtype=tf.int64, name="step")
    epoch = tf.Variable(0, dtype=tf.int64, name="epoch")
    position = tf.Variable(0, dtype=tf.int64, name="position")  # batches done in this epoch
    best_val = tf.Variable(float("inf"), dtype=tf.float64, name="best_val")
    bad_epochs = tf.Variable(0, dtype=tf.int64, name="bad_epochs")

    ckpt = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        step=step,
        epoch=epoch,
        position=position,
        best_val=best_val,
        bad_epochs=bad_epochs,
    )
    # Non-chief workers write to a scratch dir: all must save, only the chief's copy is kept.
    ckpt_dir = os.path.join(args.model_dir, "checkpoints")
    if not chief:
        ckpt_dir = os.path.join(
            args.model_dir, "tmp", f"worker-{strategy.cluster_resolver.task_id}"
        )
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=3)
    if manager.latest_checkpoint:  # the checkpoint also restores the feature statistics
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        print(
            f"train: resumed from {manager.latest_checkpoint} at step {int(step)} "
            f"(epoch {int(epoch) + 1}, batch {int(position)})",
            flush=True,
        )
    elif model.config.normalize_features:
        mean, variance = feature_stats(train_info.files)
        model.encoder.set_feature_stats(mean, variance)
    fns = make_step_fns(strategy, model, optimizer, args.attention_penalty, args.jit_compile)
    writer = tf.summary.create_file_writer(
        os.path.join(args.model_dir, "logs" if chief else "tmp/logs")
    )
    best_path = os.path.join(args.model_dir, "best.weights.h5")
    history: list[dict[str, float]] = []
    stopped_early = bool(args.patience and int(bad_epochs) >= args.patience)
    print(
        f"train: {train_info.images} images, {train_info.captions} captions, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {args.batch_size} "
        f"on {replicas} replica(s), policy {policy}, model {config}",
        flush=True,
    )

    def distributed(ds: tf.data.Dataset) -> Any:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return strategy.experimental_distribute_dataset(ds.with_options(options))

    while int(epoch) < args.epochs and not stopped_early:
        e = int(epoch)
        ds = caption_pairs(
            train_info.files,
            vocab,
            args.batch_size,
            shuffle=True,
            seed=args.seed * 1000 + e,
            max_tokens=args.max_tokens,
            pair_buffer=args.shuffle_buffer,
        ).skip(int(position))
        bar = keras.utils.Progbar(
            steps_per_epoch,
            verbose=1 if args.verbose == 1 else 0,
            stateful_metrics=["loss", "ce", "examples/s"],
        )
        if int(position):
            bar.update(int(position))
        epoch_loss, epoch_ce, epoch_tokens = 0.0, 0.0, 0.0
        started, seen = time.perf_counter(), 0
        for batch in distributed(ds):
            loss, tokens, ce_sum = fns.train(batch)
            step.assign_add(1)
            position.assign_add(1)
            seen += args.batch_size
            epoch_loss += float(loss) * float(tokens)
            epoch_ce += float(ce_sum)
            epoch_tokens += float(tokens)
            rate = seen / (time.perf_counter() - started)
            ce = float(ce_sum) / max(float(tokens), 1.0)
            bar.update(int(position), [("loss", float(loss)), ("ce", ce), ("examples/s", rate)])
            if chief:
                with writer.as_default(step=int(step)):
                    tf.summary.scalar("train/loss", loss)
                    tf.summary.scalar("train/cross_entropy", ce)
                    tf.summary.scalar("train/learning_rate", schedule(step - 1))
                    tf.summary.scalar("train/examples_per_second", rate)
            if int(step) % args.checkpoint_every == 0:
                manager.save(checkpoint_number=int(step))
        record = {
            "epoch": e + 1,
            "loss": epoch_loss / max(epoch_tokens, 1.0),
            "ce": epoch_ce / max(epoch_tokens, 1.0),
            "step": int(step),
        }
        if val_info is not None:
            record["val_loss"], record["val_ce"] = evaluate_loss(
                fns, distributed, val_info, vocab, args
            )
            if record["val_loss"] < float(best_val):
                best_val.assign(record["val_loss"])
                bad_epochs.assign(0)
                if chief:
                    model.save_weights(best_path)
            else:
                bad_epochs.assign_add(1)
            stopped_early = bool(args.patience and int(bad_epochs) >= args.patience)
        epoch.assign_add(1)
        position.assign(0)
        manager.save(checkpoint_number=int(step))
        history.append(record)
        if chief:
            with writer.as_default(step=int(step)):
                for k in LOSS_KEYS:
                    if k in record:
                        tf.summary.scalar(f"epoch/{k}", record[k])
        if args.verbose:
            print(
                f"train: epoch {e + 1}/{args.epochs} step {int(step)} "
                + " ".join(f"{k} {record[k]:.4f}" for k in LOSS_KEYS if k in record)
                + (" (early stop)" if stopped_early else ""),
                flush=True,
            )
    writer.flush()

    if val_info is not None and tf.io.gfile.exists(best_path):
        model.load_weights(best_path)  # early stopping keeps the best epoch
    summary = {
        "steps": int(step),
        "epochs": int(epoch),
        "steps_per_epoch": steps_per_epoch,
        "history": history,
        "best_val_loss": float(best_val) if val_info is not None else None,
        "stopped_early": stopped_early,
        "replicas": replicas,
        "policy": policy,
    }
    if chief:
        export_dir = os.path.join(args.model_dir, formats.EXPORT_DIR)
        save_export(model, vocab, features_manifest, export_dir, args.max_length, summary)
        print(f"train: exported to {export_dir} ({int(step)} steps)", flush=True)
    return summary


def evaluate_loss(
    fns: StepFns, distributed: Any, info: Any, vocab: Any, args: argparse.Namespace
) -> tuple[float, float]:
    """(loss, cross-entropy) per real token over a whole split."""
    ds = caption_pairs(
        info.files, vocab, args.batch_size, shuffle=False, max_tokens=args.max_tokens
    )
    total, ce, tokens = 0.0, 0.0, 0.0
    for batch in distributed(ds):
        loss_sum, n, ce_sum = fns.evaluate(batch)
        total += float(loss_sum)
        ce += float(ce_sum)
        tokens += float(n)
    return total / max(tokens, 1.0), ce / max(tokens, 1.0)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
