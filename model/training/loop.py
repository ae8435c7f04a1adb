"""The training loop behind `python -m model.train` (see that module for the command).

`train(args)` sets up the strategy, data, model and checkpoints (`set_up`),
runs the cross-entropy epochs (`train_epoch`, `end_epoch`), then the self-critical
ones if asked (`start_self_critical`, `scst_epoch`, `end_scst_epoch`; the reward and
the baselines live in `model.training.scst`) and exports the best epoch (`finish`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model.cli import first_line
from model.data.shards import (
    SplitInfo,
    caption_pairs,
    check_data_dir,
    feature_stats,
    image_batches,
    split_info,
)
from model.defaults import PRESETS
from model.io import formats, storage
from model.network.captioner import ShowAttendTell
from model.network.export import save_export
from model.text.vocab import Vocabulary
from model.training import scst
from model.training.steps import (
    ZERO,
    DynamicLossScale,
    PolicyStep,
    StepFns,
    Totals,
    make_policy_step,
    make_step_fns,
    run_steps,
)

# Per real token: the trained objective (cross-entropy + attention penalty) and
# the cross-entropy alone (its exp is perplexity), on train and val.
LOSS_KEYS = ("loss", "ce", "val_loss", "val_ce", "val_cider", "val_loops")
# Per self-critical epoch: mean reward (CIDEr-D of the samples), mean baseline, val.
SCST_KEYS = ("reward", "baseline", "val_cider", "val_loops")
# Flags that decide the data order or the numerics: a resumed run must keep them.
RESUME_FLAGS = (
    "batch_size",
    "seed",
    "max_tokens",
    "shuffle_buffer",
    "train_split",
    "precision",
    "learning_rate",
    "warmup_steps",
    "decay",
    "clip_norm",
    "shard_policy",
    "select_by",
    "scst_samples",
    "scst_baseline",
    "scst_learning_rate",
    "scst_max_length",
    "scst_dropout",
)
XLA_LENGTH_MULTIPLE = 4  # with --jit_compile, caption lengths are padded to buckets of 4


# ---------------------------------------------------------------- set-up pieces


def choose_strategy() -> tuple[tf.distribute.Strategy, bool]:
    """(strategy, is_chief): MultiWorker when TF_CONFIG names several tasks, else Mirrored."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().as_dict()
    tasks = sum(len(v) for k, v in jobs.items() if k in ("worker", "chief"))
    if tasks > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        kind, index = resolver.task_type, resolver.task_id
        chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in jobs)
        return strategy, chief
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([d.name for d in gpus] or ["/cpu:0"]), True


def precision_policy(choice: str | None) -> str:
    """--mixed_precision -> Keras policy name (float16 needs loss scaling, bfloat16 does not)."""
    if choice is None:
        return "float32"
    if choice == "auto":
        choice = "float16" if tf.config.list_logical_devices("GPU") else "bfloat16"
    return f"mixed_{choice}"


def lr_schedule(
    peak: float, warmup: int, total: int, decay: str
) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up to `peak`, then cosine decay to 10% of it ("cosine") or flat ("constant")."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / warmup if warmup else peak,
        decay_steps=max(total - warmup, 1),
        alpha=0.1 if decay == "cosine" else 1.0,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


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


def data_identity(features_manifest: dict[str, Any], vocab: Vocabulary) -> dict[str, Any]:
    """What the features are (formats.FEATURE_IDENTITY_KEYS) and the vocabulary by content:
    a checkpoint resumes only on these."""
    tokens = "\n".join(vocab.tokens).encode()
    return {
        **formats.features_identity_of(features_manifest),
        "vocab_sha256": hashlib.sha256(tokens).hexdigest(),
    }


def check_run_config(
    model_dir: str,
    model: dict[str, Any],
    training: dict[str, Any],
    chief: bool,
    data: dict[str, Any] | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """MODEL_DIR/config.json records the model, the data-order/numerics flags, the
    features' identity and vocabulary, and the epochs the learning-rate schedule spans.

    A checkpoint of another model, a resume with a changed flag of `RESUME_FLAGS`
    or on other features or another vocabulary fails at start with one line (a changed
    batch size would silently misalign the skipped batches; another precision fails deep
    in restore; another vocabulary would train on the wrong words). Returns the record.
    """
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        record = {"model": model, "training": training, "data": data or {}}
        record["schedule"] = {"epochs": epochs}
        if chief:  # written whole: the other workers may read it at any moment
            storage.write_text(path, json.dumps(record, indent=2))
        return record
    with tf.io.gfile.GFile(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise formats.FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise formats.FormatError(f"{path}: not a JSON object")
    saved_model = saved.get("model", saved)  # before 2026-11 the file held the model alone
    diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
    if diff:
        raise formats.FormatError(
            f"{model_dir} holds a checkpoint of another model: "
            + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items())
            + " (use a new --model_dir)"
        )
    for key, value in training.items():
        if key in saved.get("training", {}) and saved["training"][key] != value:
            raise formats.FormatError(
                f"{model_dir} was trained with {key} {saved['training'][key]}, this run has "
                f"{value}: resume with the same --{_flag(key)} (or use a new --model_dir)"
            )
    if missing := {k: v for k, v in training.items() if k not in saved.get("training", {})}:
        saved = {**saved, "training": {**saved.get("training", {}), **missing}}
        if chief:  # e.g. the self-critical flags, once that stage starts
            storage.write_text(path, json.dumps(saved, indent=2))
    for key, value in (data or {}).items():
        if key in saved.get("data", {}) and saved["data"][key] != value:
            what = "a vocabulary" if key == "vocab_sha256" else f"features with {key}"
            raise formats.FormatError(
                f"{model_dir} was trained on {what} other than --data_dir's "
                f"({key} was {saved['data'][key]!r}, now {value!r}); use a new --model_dir"
            )
    return saved


def _flag(key: str) -> str:
    return {"precision": "mixed_precision"}.get(key, key)


def distribute(
    strategy: tf.distribute.Strategy, ds: tf.data.Dataset, files: int, policy: str
) -> Any:
    """Hosts split whole shard files when each gets several, else every batch (DATA)."""
    workers = num_workers(strategy)
    by_file = policy == "file" or (policy == "auto" and files >= 4 * workers)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE
        if by_file
        else tf.data.experimental.AutoShardPolicy.DATA
    )
    return strategy.experimental_distribute_dataset(ds.with_options(options))


# ---------------------------------------------------------------- the training state


@dataclass(frozen=True)
class SelfCritic:
    """What a self-critical step needs besides the model: the reward's document
    frequencies, the compiled sampler, greedy decoder and policy update, and the step's
    size in images."""

    df: scst.CiderD
    sample: Any  # (features, seed (2,), first image, images) -> K captions per image
    greedy: Any  # features -> greedy captions (the greedy baseline)
    step: PolicyStep
    images_per_step: int
    steps_per_epoch: int


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
    manager: tf.train.CheckpointManager
    writer: Any
    val_decoder: Any = None  # greedy decoding of the val split, traced once (select_by cider)
    scst_optimizer: keras.optimizers.Optimizer | None = None  # --scst_epochs: constant rate
    critic: SelfCritic | None = None  # built when the self-critical epochs start

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

    def dataset(self, info: SplitInfo, shuffle: bool, seed: int = 0) -> tf.data.Dataset:
        return caption_pairs(
            info.files,
            self.vocab,
            self.global_batch,
            shuffle=shuffle,
            seed=seed,
            max_tokens=self.args.max_tokens,
            pair_buffer=self.args.shuffle_buffer,
            length_multiple=XLA_LENGTH_MULTIPLE if self.args.jit_compile else 1,
        )


def set_up(args: argparse.Namespace) -> Run:
    """Reads the data dir, builds strategy, model and optimizer, restores the latest checkpoint."""
    features_manifest, vocab = check_data_dir(args.data_dir)
    train_info = split_info(args.data_dir, features_manifest, args.train_split)
    has_val = args.val_split in features_manifest.get("splits", {})
    val_info = split_info(args.data_dir, features_manifest, args.val_split) if has_val else None

    strategy, chief = choose_strategy()
    if chief:
        lock_model_dir(args.model_dir)
    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size or (args.per_replica_batch_size or 0) * replicas or 64
    policy = precision_policy(args.mixed_precision)
    config = model_config(args, len(vocab))
    # The self-critical flags are fixed from the run that starts that stage on: a
    # cross-entropy run does not pin the rate of a self-critical stage added later.
    training = {
        k: getattr(args, k, None)
        for k in RESUME_FLAGS
        if args.scst_epochs or not k.startswith("scst_")
    }
    training.update(batch_size=global_batch, precision=policy)
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
        "position": tf.Variable(0, dtype=tf.int64, name="position"),  # batches done this epoch
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
    # Dropout's random state: Keras keeps it out of the model's checkpoint, and without it
    # a resumed run draws other masks than the run it continues.
    seeds = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    extra = {"scst_optimizer": scst_optimizer} if scst_optimizer is not None else {}
    ckpt = tf.train.Checkpoint(
        model=model, optimizer=optimizer, dropout_seeds=seeds, **extra, **state
    )
    manager = checkpoint_manager(ckpt, args.model_dir, strategy, chief)
    fns = make_step_fns(
        strategy,
        model,
        optimizer,
        args.attention_penalty,
        clip_norm=args.clip_norm,
        loss_scale=loss_scale,
        jit_compile=args.jit_compile,
    )
    logs = os.path.join(args.model_dir, "logs" if chief else f"tmp/logs-{_task_id(strategy)}")
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
        manager=manager,
        writer=tf.summary.create_file_writer(logs),
        scst_optimizer=scst_optimizer,
    )
    restore_or_initialise(run, ckpt)
    return run


def num_workers(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(1, sum(len(v) for k, v in spec.items() if k in ("worker", "chief")))


def _task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def checkpoint_manager(
    ckpt: tf.train.Checkpoint, model_dir: str, strategy: tf.distribute.Strategy, chief: bool
) -> tf.train.CheckpointManager:
    """The chief writes MODEL_DIR/checkpoints; every worker must save too, into scratch."""
    if chief:
        return tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "checkpoints"), 3)
    scratch = os.path.join(model_dir, "tmp", f"worker-{_task_id(strategy)}")
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
            reason = first_line(e)
            print(
                f"train: warning: checkpoint {prefix} is unreadable ({type(e).__name__}: "
                f"{reason}); trying the one before it",
                file=sys.stderr,
                flush=True,
            )
    if candidates:
        raise formats.FormatError(
            f"{ckpt_dir}: none of {len(candidates)} checkpoints is readable; "
            "delete the folder to start over"
        )
    return None


def restore_or_initialise(run: Run, ckpt: tf.train.Checkpoint) -> None:
    """Every worker restores the chief's latest readable checkpoint, so all resume at one
    position (they see the same files and make the same choice)."""
    latest = restore_newest_readable(ckpt, os.path.join(run.args.model_dir, "checkpoints"))
    if latest:  # the checkpoint also restores the feature statistics
        print(
            f"train: resumed from {latest} at step {run.var('step')} "
            f"(epoch {run.var('epoch') + 1}, batch {run.var('position')})",
            flush=True,
        )
    elif run.model.config.normalize_features:
        mean, variance = feature_stats(run.train_info.files)
        run.model.encoder.set_feature_stats(mean, variance)


# ---------------------------------------------------------------- the loop


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
        totals = train_epoch(run)
        end_epoch(run, totals)
    if not run.done:
        start_self_critical(run)
    while not run.done:
        sums = scst_epoch(run)
        end_scst_epoch(run, sums)
    run.writer.flush()
    return finish(run)


def train_epoch(run: Run) -> Totals:
    """Runs the rest of the current epoch; checkpoints every --checkpoint_every steps."""
    args, e = run.args, run.var("epoch")
    ds = run.dataset(run.train_info, shuffle=True, seed=args.seed * 1000 + e)
    iterator = iter(
        distribute(
            run.strategy, ds.skip(run.var("position")), len(run.train_info.files), args.shard_policy
        )
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
    """Validation, early-stopping bookkeeping, the epoch's record and a checkpoint."""
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
        record["val_loss"], record["val_ce"] = val.loss, val.ce
        if args.select_by == "cider":
            record.update(validation_captions(run))
        # best_val holds the selection metric as a loss: lower is better.
        score = -record["val_cider"] if args.select_by == "cider" else val.loss
        if score < float(run.state["best_val"].numpy()):
            run.state["best_val"].assign(score)
            run.state["bad_epochs"].assign(0)
            record["selected"] = True
            if run.chief:
                run.model.save_weights(best_weights_path(args.model_dir))
        else:
            run.state["bad_epochs"].assign_add(1)
    close_epoch(run, record, "epoch", "epoch_sums", LOSS_KEYS, "epoch")
    if args.verbose:
        print(
            f"train: epoch {e + 1}/{args.epochs} step {run.var('step')} "
            + " ".join(f"{k} {record[k]:.4f}" for k in LOSS_KEYS if k in record)
            + (" (early stop)" if run.stopped_early else ""),
            flush=True,
        )


def close_epoch(
    run: Run, record: dict[str, Any], counter: str, sums: str, keys: tuple, prefix: str
) -> None:
    """The end of an epoch of either kind: its record joins the history, `counter`
    advances, the position and the running `sums` restart, a checkpoint is written, and
    the record's `keys` go to TensorBoard as `prefix/key`."""
    run.state["history"].assign(json.dumps([*run.history, record]))
    run.state[counter].assign_add(1)
    run.state["position"].assign(0)
    run.state[sums].assign(tf.zeros_like(run.state[sums]))
    run.manager.save(checkpoint_number=run.var("step"))
    if run.chief:
        with run.writer.as_default(step=run.var("step")):
            for key in keys:
                if key in record:
                    tf.summary.scalar(f"{prefix}/{key}", record[key])


def validation_captions(run: Run) -> dict[str, float]:
    """Greedy captions of the val split (with the default repeat blocking), scored with
    CIDEr-D, and the share that loops: what the checkpoint is chosen by."""
    from model.defaults import DEFAULT_BLOCK_REPEATS
    from model.evaluation.metrics import cider
    from model.evaluation.report import decode_split
    from model.text.ngrams import looping_figures

    if run.val_decoder is None:
        from model.decoding.decoders import make_decoder

        run.val_decoder = make_decoder(
            run.model, run.args.max_length, block_repeats=DEFAULT_BLOCK_REPEATS
        )
    decoded = decode_split(
        run.model,
        run.vocab,
        run.val_info.files,
        256,
        run.args.max_length,
        decode=run.val_decoder,
    )
    ids = decoded["image_id"]
    refs = dict(zip(ids, decoded["references"], strict=True))
    preds = dict(zip(ids, decoded["caption"], strict=True))
    figures = looping_figures(decoded["caption"], decoded["hit_max_length"])
    return {"val_cider": cider(refs, preds), "val_loops": figures["repeated_3gram_share"]}


def evaluate_split(run: Run, info: SplitInfo) -> Totals:
    """Loss and cross-entropy per real token over a whole split."""
    ds = run.dataset(info, shuffle=False)
    iterator = iter(distribute(run.strategy, ds, len(info.files), run.args.shard_policy))
    totals = ZERO
    while True:
        chunk = run_steps(run.fns.evaluate, iterator, 1000)
        totals += chunk
        if chunk.steps < 1000:
            return totals


# ---------------------------------------------------------------- self-critical epochs


def self_critical_calls(
    strategy: tf.distribute.Strategy,
    model: ShowAttendTell,
    optimizer: keras.optimizers.Optimizer,
    samples: int,
    max_length: int,
    clip_norm: float,
    dropout: bool,
) -> tuple[Any, Any, PolicyStep]:
    """The compiled calls of a self-critical step, as training runs them (and
    `benchmarks.scst` times them): the sampler ((features, seed, first image, images) ->
    K captions per image), the greedy decoder (the greedy baseline) and the policy
    update, all with decoding's banned tokens and repeat blocking."""
    from model.decoding.decoders import banned_tokens, greedy_decode_graph, sample_graph
    from model.defaults import DEFAULT_BLOCK_REPEATS

    spec = tf.TensorSpec([None, *model.config.feature_shape], tf.float32)
    scalar = tf.TensorSpec([], tf.int32)

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32), scalar, scalar])
    def sample(
        features: tf.Tensor, seed: tf.Tensor, first_image: tf.Tensor, images: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        return sample_graph(
            model,
            features,
            max_length,
            samples,
            seed,
            DEFAULT_BLOCK_REPEATS,
            first_image=first_image,
            images=images,
        )

    @tf.function(input_signature=[spec])
    def greedy(features: tf.Tensor) -> dict[str, tf.Tensor]:
        return greedy_decode_graph(model, features, max_length, DEFAULT_BLOCK_REPEATS)

    step = make_policy_step(
        strategy,
        model,
        optimizer,
        samples,
        clip_norm,
        dropout=dropout,
        block_repeats=DEFAULT_BLOCK_REPEATS,
        banned=banned_tokens(allow_unk=False),
    )
    return sample, greedy, step


def start_self_critical(run: Run) -> None:
    """Before the first self-critical step: start from the best cross-entropy epoch (as
    ruotianluo's --start_from does), and build the reward and the compiled calls."""
    args = run.args
    best = best_weights_path(args.model_dir)
    fresh = run.var("scst_epoch") == 0 and run.var("position") == 0
    if fresh and run.val_info is not None and tf.io.gfile.exists(best):
        run.model.load_weights(best)  # a checkpoint taken after this holds the weights
    k = args.scst_samples
    sample, greedy, step = self_critical_calls(
        run.strategy,
        run.model,
        run.scst_optimizer,
        k,
        args.scst_max_length,
        args.clip_norm,
        dropout=args.scst_dropout == "on",
    )
    images = max(1, math.ceil(run.global_batch / k))
    run.critic = SelfCritic(
        df=scst.load_or_build_df(
            args.data_dir, run.vocab, args.train_split, run.train_info.files, run.chief
        ),
        sample=sample,
        greedy=greedy,
        step=step,
        images_per_step=images,
        steps_per_epoch=max(1, math.ceil(run.train_info.images / images)),
    )
    lo, hi = run.critic.step.share(images)
    print(
        f"train: self-critical: {images} images x {k} samples per step (this worker samples "
        f"{hi - lo}), {run.critic.steps_per_epoch} steps/epoch x {args.scst_epochs} epochs, "
        f"baseline {args.scst_baseline}, learning rate {args.scst_learning_rate}, dropout "
        f"{args.scst_dropout}",
        flush=True,
    )


def scst_step(run: Run, batch: dict[str, tf.Tensor]) -> np.ndarray:
    """One self-critical update on a global batch of images, of which this worker samples,
    scores and back-propagates its share. Returns the whole batch's sums (reward,
    baseline, samples)."""
    args, critic, k = run.args, run.critic, run.args.scst_samples
    images = int(batch["features"].shape[0])
    lo, hi = critic.step.share(images)
    features = batch["features"][lo:hi]
    references = scst.reference_ids(batch["captions"][lo:hi].to_list(), run.vocab)
    # Stateless draws seeded by the run's seed and the step, each row its own: every
    # split of the batch between workers, and a resumed run, draws the same captions.
    seed = tf.constant([args.seed, run.var("step")], tf.int32)
    samples = {key: v.numpy() for key, v in critic.sample(features, seed, lo, images).items()}
    greedy = None
    if args.scst_baseline == "greedy":
        greedy = {key: v.numpy() for key, v in critic.greedy(features).items()}
    rewards = scst.score_samples(critic.df, samples, references, k, greedy)
    sums = critic.step(
        images,
        features.numpy(),
        scst.teacher_tokens(samples["token_ids"]),
        rewards.advantages,
        rewards.rewards,
        rewards.baselines,
    )
    return sums[2:]


def scst_epoch(run: Run) -> np.ndarray:
    """Runs the rest of the current self-critical epoch; checkpoints every
    --checkpoint_every steps. Returns the epoch's sums (reward, baseline, samples)."""
    args, critic, e = run.args, run.critic, run.var("scst_epoch")
    ds = image_batches(run.train_info.files, critic.images_per_step, args.seed * 1000 + 500 + e)
    bar = keras.utils.Progbar(
        critic.steps_per_epoch,
        verbose=int(args.verbose == 1),
        stateful_metrics=["reward", "baseline"],
    )
    sums = run.state["scst_sums"].numpy()
    for batch in ds.skip(run.var("position")):
        step_sums = scst_step(run, batch)
        sums = sums + step_sums
        for name in ("step", "position"):
            run.state[name].assign_add(1)
        run.state["scst_sums"].assign(sums)
        mean = sums[:2] / max(sums[2], 1.0)
        bar.update(
            min(run.var("position"), critic.steps_per_epoch),
            [("reward", mean[0]), ("baseline", mean[1])],
        )
        if run.chief:
            reward, baseline = step_sums[:2] / max(step_sums[2], 1.0)
            with run.writer.as_default(step=run.var("step")):
                tf.summary.scalar("scst/reward", float(reward))
                tf.summary.scalar("scst/baseline", float(baseline))
        if run.var("step") % args.checkpoint_every == 0:
            run.manager.save(checkpoint_number=run.var("step"))
    return sums


def end_scst_epoch(run: Run, sums: np.ndarray) -> None:
    """Validation by greedy CIDEr-D (the export is the best epoch of either kind), the
    epoch's record and a checkpoint."""
    args, e = run.args, run.var("scst_epoch")
    record: dict[str, Any] = {
        "scst_epoch": e + 1,
        "reward": float(sums[0] / max(sums[2], 1.0)),
        "baseline": float(sums[1] / max(sums[2], 1.0)),
        "samples": int(sums[2]),
        "step": run.var("step"),
    }
    if run.val_info is not None:
        record.update(validation_captions(run))
        if -record["val_cider"] < float(run.state["best_val"].numpy()):
            run.state["best_val"].assign(-record["val_cider"])
            record["selected"] = True
            if run.chief:
                run.model.save_weights(best_weights_path(args.model_dir))
    close_epoch(run, record, "scst_epoch", "scst_sums", SCST_KEYS, "scst_epoch")
    if args.verbose:
        print(
            f"train: self-critical epoch {e + 1}/{args.scst_epochs} step {run.var('step')} "
            + " ".join(f"{key} {record[key]:.4f}" for key in SCST_KEYS if key in record),
            flush=True,
        )


def scst_summary(run: Run) -> dict[str, Any]:
    """The self-critical stage in the export's training summary."""
    last = [r for r in run.history if "scst_epoch" in r]
    return {
        "samples": run.args.scst_samples,
        "baseline": run.args.scst_baseline,
        "learning_rate": run.args.scst_learning_rate,
        "max_length": run.args.scst_max_length,
        "dropout": run.args.scst_dropout,
        "reward": last[-1]["reward"] if last else None,
    }


def selected_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which epoch the export holds: the last one marked selected (best on val)."""
    chosen = [r for r in history if r.get("selected")]
    if not chosen:
        return None
    r = chosen[-1]
    phase = "self-critical" if "scst_epoch" in r else "cross-entropy"
    return {"phase": phase, "epoch": r.get("scst_epoch", r.get("epoch"))}


def best_val(run: Run) -> float | None:
    """The best epoch's selection metric (CIDEr, or the val loss), None without val."""
    if run.val_info is None or not math.isfinite(float(run.state["best_val"].numpy())):
        return None
    value = float(run.state["best_val"].numpy())
    return -value if run.args.select_by == "cider" else value


def best_weights_path(model_dir: str) -> str:
    return os.path.join(model_dir, "best.weights.h5")


def finish(run: Run) -> dict[str, Any]:
    """Keeps the best epoch (early stopping) and, on the chief, writes the export."""
    best = best_weights_path(run.args.model_dir)
    if run.val_info is not None and tf.io.gfile.exists(best):
        run.model.load_weights(best)
    summary = {
        "steps": run.var("step"),
        "epochs": run.var("epoch"),
        "steps_per_epoch": run.steps_per_epoch,
        "global_batch": run.global_batch,
        "history": run.history,
        "ce_epochs": run.var("epoch"),
        "scst_epochs": run.var("scst_epoch"),
        **({"scst": scst_summary(run)} if run.var("scst_epoch") else {}),
        "selected": selected_epoch(run.history),
        "selected_by": run.args.select_by if run.val_info else None,
        "best_val": best_val(run),
        "stopped_early": run.stopped_early,
        "replicas": run.strategy.num_replicas_in_sync,
        "policy": run.policy,
    }
    if run.chief:
        export_dir = os.path.join(run.args.model_dir, formats.EXPORT_DIR)
        save_export(
            run.model, run.vocab, run.features_manifest, export_dir, run.args.max_length, summary
        )
        print(f"train: exported to {export_dir} ({summary['steps']} steps)", flush=True)
        if not getattr(run.args, "no_serving_export", False):
            from model.inference.saved_model import write_serving_export

            path = write_serving_export(export_dir)
            print(f"train: serving SavedModel in {path}", flush=True)
    return summary
