"""The self-critical stage (Rennie et al. 2017): CIDEr-D as the reward after cross-entropy.

`start` takes the best cross-entropy epoch's weights (as ruotianluo's --start_from
does), the reward (`model.training.reward`) and the compiled calls; each `epoch` walks
the training images in a seeded order, a `step` samples K captions per image (with
the model's dropout, `--scst_dropout on`), scores them and applies the policy update
(`make_policy_step`), which scores each sample under the masks it was drawn with.
Each worker samples and back-propagates its replicas' share of every step's images;
every draw is keyed by the seed, the step and the row's place in the global batch, so
N replicas or hosts apply the update of one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model.data.shards import image_batches
from model.network.captioner import ShowAttendTell
from model.text.ngrams import teacher_block_mask
from model.text.vocab import PAD_ID
from model.training import reward
from model.training.cluster import local_replica_ids, replica_images
from model.training.run import Run
from model.training.selection import SCST_KEYS, close_epoch, judge, validation
from model.training.steps import apply_summed_gradients, real_tokens


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
    """The sampler, the greedy decoder (the greedy baseline) and the policy update, as
    training runs them (and `benchmarks.scst` times them), with decoding's banned
    tokens and repeat blocking."""
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
            dropout=dropout,
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


def step(run: Run, critic: SelfCritic, batch: dict[str, tf.Tensor]) -> tuple[np.ndarray, float]:
    """One self-critical update on a global batch of images, of which this worker samples,
    scores and back-propagates its share. Returns the whole batch's sums (reward,
    baseline, samples) and the mean |advantage| of this worker's samples."""
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
        seed,
        features.numpy(),
        reward.teacher_tokens(samples["token_ids"]),
        rewards.advantages,
        rewards.rewards,
        rewards.baselines,
    )
    return sums[2:], float(np.abs(rewards.advantages).mean()) if len(rewards.rewards) else 0.0


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
        step_sums, spread = step(run, critic, batch)
        sums = sums + step_sums
        for name in ("step", "position"):
            run.state[name].assign_add(1)
        run.state["scst_sums"].assign(sums)
        mean = sums[:2] / max(sums[2], 1.0)
        # With the mean-of-others baseline, mean reward = mean baseline: the bar shows
        # how far samples stand from their baselines instead (this worker's, averaged).
        shown = ("baseline", mean[1]) if args.scst_baseline == "greedy" else ("|adv|", spread)
        bar.update(min(run.var("position"), critic.steps_per_epoch), [("reward", mean[0]), shown])
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
    greedy_baseline = args.scst_baseline == "greedy"
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
    if args.verbose:  # the mean-of-others baseline averages to the reward: not shown
        keys = [k for k in SCST_KEYS if k in record and (k != "baseline" or greedy_baseline)]
        print(
            f"train: self-critical epoch {e + 1}/{args.scst_epochs} step {run.var('step')} "
            + " ".join(f"{key} {record[key]:.4f}" for key in keys),
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


# ---------------------------------------------------------------- the policy update


def token_log_probs(
    model: ShowAttendTell,
    features: tf.Tensor,
    tokens: tf.Tensor,
    never: tf.Tensor,
    block_repeats: int,
    masks: tuple[tf.Tensor, tf.Tensor] | None,
) -> tf.Tensor:
    """Each sampled token's log-probability under the distribution the sampler drew it
    from: features (n, L, D) repeated per sample, tokens (n, T + 1) `<start>` + sample ->
    (n, T), 0 at `<pad>`. The `never` tokens and, with `block_repeats`, the tokens that
    would repeat an n-gram are out of the softmax, and `masks` are the sampler's dropout
    (`model.decoding.decoders.sequence_dropout_masks`), or None for none."""
    logits, _ = model((features, tokens[:, :-1]), training=False, masks=masks)
    targets = tokens[:, 1:]
    logits = tf.cast(logits, tf.float32) + never
    if block_repeats:
        logits += teacher_block_mask(targets, block_repeats, model.config.vocab_size)
    chosen = tf.gather(tf.nn.log_softmax(logits), targets, batch_dims=2)  # (n, T)
    return chosen * tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)


@dataclass(frozen=True)
class PolicyStep:
    """The self-critical update of one global batch of images.

    Each worker holds only its share of the batch (`share`): it samples, scores and
    passes in the rows of those images; each of its replicas takes its own images'
    rows. The loss is divided by the whole batch's token count (one all-reduce), the
    gradients are summed with one all-reduce, clipped and applied as in cross-entropy
    training, so N replicas on any number of hosts apply the update of one device.
    """

    strategy: tf.distribute.Strategy
    samples: int  # K rows per image
    replica_ids: list[int]  # this worker's
    compiled: Callable[..., tf.Tensor]

    def share(self, images: int) -> tuple[int, int]:
        """This worker's images [lo, hi) of a batch of `images`."""
        ranges = replica_images(images, self.strategy.num_replicas_in_sync)
        return ranges[self.replica_ids[0]][0], ranges[self.replica_ids[-1]][1]

    def __call__(
        self,
        images: int,
        seed: tf.Tensor,
        features: np.ndarray,
        tokens: np.ndarray,
        advantages: np.ndarray,
        rewards: np.ndarray,
        baselines: np.ndarray,
    ) -> np.ndarray:
        """This worker's share: the sampler's `seed`, features (n, L, D) of its images,
        then per sample row (n * K): tokens (`<start>` + sampled ids), advantages, rewards
        and baselines. Returns the sums over the whole batch: (policy loss * tokens,
        tokens, rewards, baselines, samples)."""
        ranges = replica_images(images, self.strategy.num_replicas_in_sync)
        first = self.share(images)[0]
        k = self.samples

        def split(array: np.ndarray, rows_per_image: int) -> Any:
            def value(ctx: tf.distribute.experimental.ValueContext) -> tf.Tensor:
                lo, hi = ranges[ctx.replica_id_in_sync_group]
                return tf.constant(
                    array[(lo - first) * rows_per_image : (hi - first) * rows_per_image]
                )

            return self.strategy.experimental_distribute_values_from_function(value)

        rows = (tokens, *(a.astype(np.float32) for a in (advantages, rewards, baselines)))
        places = np.arange(first * k, first * k + len(tokens), dtype=np.int32)
        args = [split(features.astype(np.float32), 1)] + [split(a, k) for a in rows]
        args += [split(places, k), seed, tf.constant(images * k, tf.int32)]
        return self.compiled(*args).numpy()


def make_policy_step(
    strategy: tf.distribute.Strategy,
    model: ShowAttendTell,
    optimizer: keras.optimizers.Optimizer,
    samples: int,
    clip_norm: float = 0.0,
    dropout: bool = True,
    block_repeats: int = 0,
    banned: tuple[int, ...] = (),
) -> PolicyStep:
    """The self-critical update as one compiled call (see `PolicyStep`): each sample is
    scored under the distribution that drew it (`token_log_probs`). With `dropout`, the
    sampler drew with dropout on (as ruotianluo's model samples in train mode) and the
    pass re-draws its masks from the seed and each row's place, so the gradient is
    REINFORCE's for the policy that sampled, on any split of the batch."""
    from model.decoding.decoders import sequence_dropout_masks

    variables = model.trainable_variables
    never = np.zeros(model.config.vocab_size, np.float32)
    never[list(banned)] = -1e9
    dropout = dropout and model.config.dropout > 0

    def replica_step(
        features: tf.Tensor,
        tokens: tf.Tensor,
        advantages: tf.Tensor,
        rewards: tf.Tensor,
        baselines: tf.Tensor,
        rows: tf.Tensor,
        seed: tf.Tensor,
        total_rows: tf.Tensor,
    ) -> tf.Tensor:
        ctx = tf.distribute.get_replica_context()
        local_tokens = real_tokens(tokens)
        global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
        global_tokens = tf.maximum(global_tokens, 1.0)

        def gradients() -> tuple[list[tf.Tensor], tf.Tensor]:
            masks = None
            if dropout:
                steps = tf.shape(tokens)[1] - 1
                masks = sequence_dropout_masks(model, seed, steps, rows, total_rows)
            with tf.GradientTape() as tape:
                chosen = token_log_probs(
                    model, tf.repeat(features, samples, axis=0), tokens, never, block_repeats, masks
                )
                sequence = tf.reduce_sum(chosen, axis=1)  # log p(w_i | I)
                loss = -tf.reduce_sum(advantages * sequence) / global_tokens
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
            return grads, loss

        grads, loss = tf.cond(
            tf.shape(tokens)[0] > 0,
            gradients,
            lambda: ([tf.zeros_like(v) for v in variables], tf.constant(0.0)),
        )
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        ctx.merge_call(
            lambda strategy, g: apply_summed_gradients(strategy, optimizer, g, variables),
            args=(grads,),
        )
        count = tf.cast(tf.shape(rewards)[0], tf.float32)
        return tf.stack(
            [
                loss * global_tokens,
                local_tokens,
                tf.reduce_sum(rewards),
                tf.reduce_sum(baselines),
                count,
            ]
        )

    @tf.function(reduce_retracing=True)
    def step(*per_replica: Any) -> tf.Tensor:
        sums = strategy.run(replica_step, args=per_replica)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return PolicyStep(strategy, samples, local_replica_ids(strategy), step)
