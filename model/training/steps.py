"""Distributed train and eval steps: N replicas update exactly as one device on the whole batch.

Each replica divides its summed loss by the *global* number of real tokens, its
gradients are summed over replicas with one all-reduce, and only then clipped to
a global norm and applied. Keras's own `clipnorm`/`global_clipnorm` run inside
`optimizer.apply` *before* its cross-replica sum, which lets the threshold grow
with the replica count, so the update is applied here from the summed gradients.

Several steps run in one compiled call (`steps_per_execution`): the losses are
summed on the device and the host sees them once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from model.network.captioner import ShowAttendTell, combine_loss, loss_parts
from model.text.vocab import PAD_ID


class Totals(NamedTuple):
    """Sums over the steps of one call, over all replicas (host floats)."""

    objective: float  # summed cross-entropy + lambda * summed attention penalty
    cross_entropy: float
    tokens: float  # real target tokens
    pairs: float  # image-caption pairs
    steps: int  # batches done; fewer than asked when the data ended

    def __add__(self, other: tuple) -> Totals:  # type: ignore[override]
        return Totals(*(a + b for a, b in zip(self, other, strict=True)))

    @property
    def loss(self) -> float:
        """Per real token: what is optimised."""
        return self.objective / max(self.tokens, 1.0)

    @property
    def ce(self) -> float:
        """Cross-entropy per real token (its exp is perplexity)."""
        return self.cross_entropy / max(self.tokens, 1.0)


ZERO = Totals(0.0, 0.0, 0.0, 0.0, 0)


class DynamicLossScale:
    """Loss scaling for float16: halve on overflow (and skip the step), double after N good steps.

    Plain variables, outside the strategy: every replica reads the same value and
    the update runs once, in cross-replica context, from a verdict all replicas share.
    """

    def __init__(self, initial: float = 2.0**15, growth_steps: int = 2000):
        self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, name="loss_scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.growth_steps = growth_steps

    def update(self, finite: tf.Tensor) -> None:
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_steps)
        self.scale.assign(
            tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale), self.scale / 2.0)
        )
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, 0))


def apply_summed_gradients(
    strategy: tf.distribute.Strategy,
    optimizer: keras.optimizers.Optimizer,
    grads: list[Any],
    variables: list[Any],
) -> None:
    """Cross-replica context: applies gradients already summed over replicas.

    What Keras's `TFOptimizer._distributed_tf_update_step` does, minus its
    all-reduce: each variable's copies are updated with `optimizer.update_step`
    and the optimizer's step counter advances once.
    """
    learning_rate = optimizer.learning_rate  # the schedule at the optimizer's step

    def update(var: Any, grad: Any) -> Any:
        return optimizer.update_step(grad, var, learning_rate)

    for grad, var in zip(grads, variables, strict=True):
        strategy.extended.update(var.value, update, args=(grad,), group=False)
    optimizer.iterations.assign_add(1)


@dataclass
class StepFns:
    """Compiled multi-step functions over a distributed iterator: (iterator, steps) -> sums.

    Each returns float32 (objective, cross-entropy, tokens, pairs) summed over the
    steps it ran, and the number of steps (int32); see `run_steps` for host values.
    """

    train: Callable[..., Any]
    evaluate: Callable[..., Any]


def make_step_fns(
    strategy: tf.distribute.Strategy,
    model: ShowAttendTell,
    optimizer: keras.optimizers.Optimizer,
    attention_penalty: float,
    clip_norm: float = 0.0,
    loss_scale: DynamicLossScale | None = None,
    jit_compile: bool = False,
) -> StepFns:
    """Train and eval steps for `strategy`; `clip_norm` applies to the summed gradients."""
    variables = model.trainable_variables

    def forward(
        features: tf.Tensor, tokens: tf.Tensor, global_tokens: tf.Tensor, training: bool
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """-> (loss per global real token, sums (objective, ce, tokens, pairs)) of this replica."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, alphas = model((features, inputs), training=training)
        parts = loss_parts(logits, alphas, targets)
        sums = tf.stack(
            [
                parts.cross_entropy + attention_penalty * parts.penalty,
                parts.cross_entropy,
                parts.tokens,
                tf.cast(tf.shape(tokens)[0], tf.float32),
            ]
        )
        return combine_loss(parts, attention_penalty, global_tokens), sums

    def local_gradients(
        features: tf.Tensor, tokens: tf.Tensor, global_tokens: tf.Tensor
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        with tf.GradientTape() as tape:
            loss, sums = forward(features, tokens, global_tokens, training=True)
            if loss_scale is not None:
                loss = loss * loss_scale.scale
        # Dense gradients: the embedding's IndexedSlices would all-reduce by gather, with a
        # different shape on every replica; dense, it is one fixed-shape all-reduce.
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        return grads, sums

    # XLA compiles forward + backward; the all-reduces and the update stay outside it.
    gradients = tf.function(local_gradients, jit_compile=True) if jit_compile else local_gradients

    def replica_train(features: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
        ctx = tf.distribute.get_replica_context()
        global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, real_tokens(tokens))
        grads, sums = tf.cond(
            has_targets(tokens),
            lambda: gradients(features, tokens, global_tokens),
            lambda: ([tf.zeros_like(v) for v in variables], tf.zeros([4])),
        )
        # One all-reduce: every replica now holds the whole batch's gradient.
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        finite = tf.constant(True)
        if loss_scale is not None:
            grads = [g / loss_scale.scale for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        if clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        ctx.merge_call(apply, args=(grads, finite))
        return sums

    def apply(strategy: tf.distribute.Strategy, grads: list[Any], finite: Any) -> None:
        if loss_scale is None:
            apply_summed_gradients(strategy, optimizer, grads, variables)
            return
        # Replicas hold the same summed gradients, so they agree on `finite`.
        finite = strategy.experimental_local_results(finite)[0]
        tf.cond(
            finite,
            lambda: apply_summed_gradients(strategy, optimizer, grads, variables),
            lambda: None,
        )
        loss_scale.update(finite)

    def replica_eval(features: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
        return tf.cond(
            has_targets(tokens),
            lambda: forward(features, tokens, 1.0, training=False)[1],
            lambda: tf.zeros([4]),
        )

    return StepFns(multi_step(strategy, replica_train), multi_step(strategy, replica_eval))


def real_tokens(tokens: tf.Tensor) -> tf.Tensor:
    """Real (non-pad) target tokens of a batch of `<start> ... <end>` rows."""
    return tf.reduce_sum(tf.cast(tf.not_equal(tokens[:, 1:], PAD_ID), tf.float32))


def has_targets(tokens: tf.Tensor) -> tf.Tensor:
    """False for the empty batches a worker gets once its files are done (FILE sharding)."""
    shape = tf.shape(tokens)
    return tf.logical_and(shape[0] > 0, shape[1] > 1)


def multi_step(strategy: tf.distribute.Strategy, replica_fn: Callable[..., tf.Tensor]) -> Any:
    """A compiled loop of up to `steps` replica steps over a distributed iterator.

    The iterator's element spec has `None` batch and length dimensions, so one
    trace serves every batch; sums stay on the device until the call returns.
    """

    @tf.function
    def run(iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        sums = tf.zeros([4], tf.float32)
        done = tf.constant(0, tf.int32)
        for _ in tf.range(steps):
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                break
            per_replica = strategy.run(replica_fn, args=batch.get_value())
            sums += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            done += 1
        return sums, done

    return run


def run_steps(fn: Any, iterator: Any, steps: int) -> Totals:
    """Calls a `StepFns` function and brings its sums to the host (the one sync per call)."""
    sums, done = fn(iterator, tf.constant(steps, tf.int32))
    objective, ce, tokens, pairs = (float(x) for x in sums.numpy())
    return Totals(objective, ce, tokens, pairs, int(done))
