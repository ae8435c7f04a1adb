"""The self-critical stage (Rennie et al. 2017): CIDEr-D as the reward after cross-entropy.

`start` takes the best cross-entropy epoch's weights (as ruotianluo's --start_from
does) and builds the reward (`model.training.reward`) and the compiled calls; each
`epoch` walks the training images in a seeded order, `step` by step: sample K
captions per image, score them, and apply the policy update
(`model.training.steps.make_policy_step`); `end_epoch` validates and selects as the
cross-entropy epochs do.

Each worker samples, scores and back-propagates only its replicas' share of every
step's images; each row's draws are seeded by the run's seed, the step and the row's
place in the global batch, so however the batch is split, N replicas or hosts draw
the same captions and apply the update one device would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model.data.shards import image_batches
from model.network.captioner import ShowAttendTell
from model.training import reward
from model.training.run import Run
from model.training.selection import SCST_KEYS, close_epoch, judge, validation
from model.training.steps import PolicyStep, make_policy_step


@dataclass(frozen=True)
class SelfCritic:
    """What a self-critical step needs besides the model: the reward's document
    frequencies, the compiled sampler, greedy decoder and policy update, and the step's
    size in images."""

    df: reward.CiderD
    sample: Any  # (features, seed (2,), first image, images) -> K captions per image
    greedy: Any  # features -> greedy captions (the greedy baseline)
    step: PolicyStep
    images_per_step: int
    steps_per_epoch: int


def compiled_calls(
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


def start(run: Run) -> SelfCritic:
    """Before the first self-critical step: the best cross-entropy epoch's weights (kept
    in the checkpoint, the same on every worker), the reward and the compiled calls."""
    args = run.args
    fresh = run.var("scst_epoch") == 0 and run.var("position") == 0
    if fresh and run.val_info is not None and run.best.load_into_model():
        print("train: self-critical training starts from the best cross-entropy epoch", flush=True)
    k = args.scst_samples
    sample, greedy, step = compiled_calls(
        run.strategy,
        run.model,
        run.scst_optimizer,
        k,
        args.scst_max_length,
        args.clip_norm,
        dropout=args.scst_dropout == "on",
    )
    images = max(1, math.ceil(run.global_batch / k))
    critic = SelfCritic(
        df=reward.load_or_build_df(
            args.data_dir, run.vocab, args.train_split, run.train_info.files, run.chief
        ),
        sample=sample,
        greedy=greedy,
        step=step,
        images_per_step=images,
        steps_per_epoch=max(1, math.ceil(run.train_info.images / images)),
    )
    lo, hi = step.share(images)
    print(
        f"train: self-critical: {images} images x {k} samples per step (this worker samples "
        f"{hi - lo}), {critic.steps_per_epoch} steps/epoch x {args.scst_epochs} epochs, "
        f"baseline {args.scst_baseline}, learning rate {args.scst_learning_rate}, dropout "
        f"{args.scst_dropout}",
        flush=True,
    )
    return critic


def step(run: Run, critic: SelfCritic, batch: dict[str, tf.Tensor]) -> np.ndarray:
    """One self-critical update on a global batch of images, of which this worker samples,
    scores and back-propagates its share. Returns the whole batch's sums (reward,
    baseline, samples)."""
    args, k = run.args, run.args.scst_samples
    images = int(batch["features"].shape[0])
    lo, hi = critic.step.share(images)
    features = batch["features"][lo:hi]
    references = reward.reference_ids(batch["captions"][lo:hi].to_list(), run.vocab)
    # Stateless draws keyed by the run's seed and the step (the sampler folds in the time
    # step and each row draws its own): every split of the batch between workers, and a
    # resumed run, draws the same captions.
    seed = tf.constant([args.seed, run.var("step")], tf.int32)
    samples = {key: v.numpy() for key, v in critic.sample(features, seed, lo, images).items()}
    greedy = None
    if args.scst_baseline == "greedy":
        greedy = {key: v.numpy() for key, v in critic.greedy(features).items()}
    rewards = reward.score_samples(critic.df, samples, references, k, greedy)
    sums = critic.step(
        images,
        features.numpy(),
        reward.teacher_tokens(samples["token_ids"]),
        rewards.advantages,
        rewards.rewards,
        rewards.baselines,
    )
    return sums[2:]


def epoch(run: Run, critic: SelfCritic) -> np.ndarray:
    """Runs the rest of the current self-critical epoch; checkpoints every
    --checkpoint_every steps. Returns the epoch's sums (reward, baseline, samples)."""
    args, e = run.args, run.var("scst_epoch")
    ds = image_batches(run.train_info.files, critic.images_per_step, args.seed * 1000 + 500 + e)
    bar = keras.utils.Progbar(
        critic.steps_per_epoch,
        verbose=int(args.verbose == 1),
        stateful_metrics=["reward", "baseline"],
    )
    sums = run.state["scst_sums"].numpy()
    for batch in ds.skip(run.var("position")):  # every worker reads every global batch
        step_sums = step(run, critic, batch)
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
            r, b = step_sums[:2] / max(step_sums[2], 1.0)
            with run.writer.as_default(step=run.var("step")):
                tf.summary.scalar("scst/reward", float(r))
                tf.summary.scalar("scst/baseline", float(b))
        if run.var("step") % args.checkpoint_every == 0:
            run.manager.save(checkpoint_number=run.var("step"))
    return sums


def end_epoch(run: Run, sums: np.ndarray) -> None:
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
        record.update(validation(run, loss=None))
        judge(run, record, -record["val_cider"], patience=False)
    close_epoch(run, record, "scst_epoch", "scst_sums", SCST_KEYS, "scst_epoch")
    if args.verbose:
        print(
            f"train: self-critical epoch {e + 1}/{args.scst_epochs} step {run.var('step')} "
            + " ".join(f"{key} {record[key]:.4f}" for key in SCST_KEYS if key in record),
            flush=True,
        )


def summary(run: Run) -> dict[str, Any] | None:
    """The self-critical stage in the export's training summary (None before it)."""
    if not run.var("scst_epoch"):
        return None
    last = [r for r in run.history if "scst_epoch" in r]
    return {
        "samples": run.args.scst_samples,
        "baseline": run.args.scst_baseline,
        "learning_rate": run.args.scst_learning_rate,
        "max_length": run.args.scst_max_length,
        "dropout": run.args.scst_dropout,
        "reward": last[-1]["reward"] if last else None,
    }
