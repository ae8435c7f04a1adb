"""Batched beam search over any step function, compiled as one `tf.while_loop`.

The search follows fairseq and GNMT (Wu et al. 2016):
- each step scores every live hypothesis x every token (cumulative log-probs,
  shape (B, K*V)) and takes the best 2K candidates with one `top_k` over the
  flattened scores, so the token is `index % V` and the parent `index // V`;
- a candidate ending in `<end>` is set aside as finished when it ranks within
  the best K (so K = 1 is exactly greedy decoding) and is never extended; the
  best K candidates that do not end become the next live hypotheses;
- finished hypotheses are ranked by log-prob / lp(length), GNMT's length
  penalty lp(n) = ((5 + n) / 6) ** alpha, n counting `<end>`;
- the first step expands one hypothesis only (the others start at -inf);
- a row is done when it has K finished hypotheses and no live one can beat the
  K-th: log-probs only fall, so the best live log-prob over lp(max_length)
  bounds what any live hypothesis can still reach; the loop ends when every row
  is done or after `max_length` steps;
- a row where nothing finished returns its best live (partial) hypothesis.
Banned tokens (`<pad>`, `<start>`, by default `<unk>`) are masked out before the
softmax, as in greedy decoding; with `block_repeats` n, so is every token that
would repeat an n-gram of its hypothesis (`model.text.ngrams`), after the softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from model.text.ngrams import repeat_block_mask
from model.text.vocab import PAD_ID

NEG_INF = -1e9
# (tokens (N,), state with leading dimension N) -> (logits (N, V), state, attention (N, L))
StepFn = Callable[[tf.Tensor, Any], tuple[tf.Tensor, Any, tf.Tensor]]


def length_penalty(length: tf.Tensor, alpha: float) -> tf.Tensor:
    """GNMT's lp(n) = ((5 + n) / 6) ** alpha; 1 for alpha = 0."""
    return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def _gather_beams(x: tf.Tensor, parents: tf.Tensor) -> tf.Tensor:
    """x (B, K', ...) indexed by parents (B, K) -> (B, K, ...)."""
    return tf.gather(x, parents, batch_dims=1)


def _write(history: tf.Tensor, t: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    """history (B, K, T, ...) with `value` (B, K, ...) written at time t (zeros there before)."""
    steps = tf.shape(history)[2]
    at_t = tf.one_hot(t, steps, dtype=history.dtype)  # (T,)
    at_t = tf.reshape(at_t, [1, 1, -1] + [1] * (len(history.shape) - 3))
    return history + at_t * tf.expand_dims(value, 2)


def beam_search(
    step_fn: StepFn,
    initial_state: Any,
    batch: tf.Tensor,
    start_id: int,
    end_id: int,
    vocab_size: int,
    num_locations: tf.Tensor,
    beam_size: int,
    max_length: int,
    alpha: float = 0.0,
    banned: Sequence[int] = (),
    block_repeats: int = 0,
) -> dict[str, tf.Tensor]:
    """Decodes `batch` rows; `initial_state` has leading dimension B * beam_size
    (row-major: row b's hypotheses are b*K .. b*K+K-1).

    Returns the best hypothesis per row as greedy decoding does (`decoders.DecodedBatch`):
    token_ids (B, T) with `<end>` and then `<pad>` (0), per-token log_probs (B, T),
    lengths (B,) in words, hit_max_length (B,), attention (B, T, L), plus
    `score` (B,), the length-penalised log-prob that ranked it.
    """
    k, v, steps = beam_size, vocab_size, max_length
    n = batch * k
    mask = tf.zeros([v], tf.float32)
    if banned:
        mask = tf.tensor_scatter_nd_update(
            mask, [[i] for i in banned], tf.fill([len(banned)], NEG_INF)
        )
    first = tf.concat([[0.0], tf.fill([k - 1], NEG_INF)], 0)  # one hypothesis at step 0

    def empty(*shape: Any, dtype: tf.DType = tf.float32) -> tf.Tensor:
        return tf.zeros(tf.stack([batch, k, *shape]), dtype)

    live = {
        "token": tf.fill([batch, k], start_id),
        "logp": tf.tile(first[None], [batch, 1]),
        "ids": empty(steps, dtype=tf.int32),
        "token_logp": empty(steps),
        "alpha": empty(steps, num_locations),
    }
    done = {
        "score": tf.fill([batch, k], NEG_INF),
        "logp": tf.fill([batch, k], NEG_INF),
        "ids": empty(steps, dtype=tf.int32),
        "token_logp": empty(steps),
        "alpha": empty(steps, num_locations),
        "length": tf.zeros([batch, k], tf.int32),
    }
    max_lp = length_penalty(steps, alpha)

    def cond(t, live, done, state):
        best_logp = tf.reduce_max(live["logp"], axis=1)  # (B,)
        kth_done = tf.reduce_min(done["score"], axis=1)  # -inf-ish until K finished
        no_live = best_logp <= NEG_INF / 2
        row_done = tf.logical_or(kth_done >= best_logp / max_lp, no_live)
        return tf.logical_and(t < steps, tf.logical_not(tf.reduce_all(row_done)))

    def body(t, live, done, state):
        logits, state, attention = step_fn(tf.reshape(live["token"], [n]), state)
        token_logp = tf.nn.log_softmax(tf.cast(logits, tf.float32) + mask)  # (N, V)
        if block_repeats:  # after the softmax: a caption's log-prob stays the model's
            history = tf.reshape(live["ids"], [n, steps])
            token_logp += repeat_block_mask(history, t, block_repeats, v)
        token_logp = tf.reshape(token_logp, [batch, k, v])
        total = live["logp"][..., None] + token_logp  # (B, K, V)
        cand_logp, flat = tf.math.top_k(tf.reshape(total, [batch, k * v]), 2 * k)
        parent, token = flat // v, flat % v  # (B, 2K)
        step_logp = tf.gather(tf.reshape(token_logp, [batch, k * v]), flat, batch_dims=1)
        attention = tf.reshape(tf.cast(attention, tf.float32), [batch, k, -1])

        def extended(key: str, value: tf.Tensor) -> tf.Tensor:
            return _write(_gather_beams(live[key], parent), t, value)

        cand = {
            "ids": extended("ids", token),
            "token_logp": extended("token_logp", step_logp),
            "alpha": extended("alpha", _gather_beams(attention, parent)),
        }
        ends = tf.equal(token, end_id)
        in_top_k = tf.range(2 * k)[None] < k
        # Finished: candidates ending in <end> among the best K, merged with earlier ones.
        finishing = tf.logical_and(ends, in_top_k)
        finish_score = tf.where(
            tf.logical_and(finishing, cand_logp > NEG_INF / 2),
            cand_logp / length_penalty(t + 1, alpha),
            NEG_INF,
        )
        pool_score = tf.concat([done["score"], finish_score], 1)  # (B, 3K)
        done_score, keep = tf.math.top_k(pool_score, k)

        def merged(key: str, new: tf.Tensor) -> tf.Tensor:
            return _gather_beams(tf.concat([done[key], new], 1), keep)

        done = {
            "score": done_score,
            "logp": merged("logp", cand_logp),
            "ids": merged("ids", cand["ids"]),
            "token_logp": merged("token_logp", cand["token_logp"]),
            "alpha": merged("alpha", cand["alpha"]),
            "length": merged("length", tf.fill(tf.shape(token), t + 1)),
        }
        # Live: the best K candidates that do not end (at least K of the 2K do not).
        live_logp, pick = tf.math.top_k(tf.where(ends, NEG_INF, cand_logp), k)
        live = {
            "token": _gather_beams(token, pick),
            "logp": live_logp,
            **{key: _gather_beams(cand[key], pick) for key in ("ids", "token_logp", "alpha")},
        }
        rows = tf.repeat(tf.range(batch) * k, k)
        parents = rows + tf.reshape(_gather_beams(parent, pick), [n])
        state = tf.nest.map_structure(lambda s: tf.gather(s, parents), state)
        return t + 1, live, done, state

    t, live, done, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), live, done, initial_state),
        maximum_iterations=steps,
    )
    any_done = done["score"][:, 0] > NEG_INF / 2
    # Fallback: the best partial hypothesis, ranked as if it ended at max_length.
    best_live = tf.argmax(live["logp"], axis=1, output_type=tf.int32)

    def best(key: str) -> tf.Tensor:
        from_done = done[key][:, 0]
        from_live = tf.gather(live[key], best_live, batch_dims=1)
        shape = tf.concat([[batch], tf.ones([tf.rank(from_done) - 1], tf.int32)], 0)
        return tf.where(tf.reshape(any_done, shape), from_done, from_live)

    token_ids = best("ids")
    is_word = tf.logical_and(tf.not_equal(token_ids, end_id), tf.not_equal(token_ids, PAD_ID))
    live_score = tf.gather(live["logp"], best_live, batch_dims=1) / max_lp
    return {
        "token_ids": token_ids,
        "log_probs": best("token_logp"),
        "lengths": tf.reduce_sum(tf.cast(is_word, tf.int32), axis=1),
        "hit_max_length": tf.logical_not(any_done),
        "attention": best("alpha"),
        "score": tf.where(any_done, done["score"][:, 0], live_score),
    }
