"""Repeated n-grams: the decoders' blocking mask (in the graph) and the looping figures.

A captioner trained by teacher forcing on a few thousand photos loops: "a man in
a blue shirt and a blue shirt and a blue shirt ...". The field's standard cure at
decoding time (OpenNMT's `block_ngram_repeats`, fairseq's `no_repeat_ngram_size`)
forbids any token that would complete an n-gram the caption already holds: with
n = 3, after "... a blue shirt and a blue", "shirt" is banned. The ban is applied
to the log-probabilities after the softmax, so a caption's log-prob stays the
model's own.

`looping_figures` measures the symptom on finished captions, the way evaluation
and the caption tables' manifest report it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

NEG_INF = -1e9
# The n-gram size the figures are measured with (the symptom users see).
LOOP_NGRAM = 3


def repeat_block_mask(history: Any, t: Any, n: int, vocab_size: int) -> Any:
    """The additive mask (N, V) that bans every token completing a repeated n-gram.

    Args:
      history: (N, T) int32 tokens generated so far; positions >= t are ignored.
      t: scalar int32, the number of tokens generated so far (the step being decided).
      n: n-gram size (>= 1); 0 means no blocking and is handled by the caller.
      vocab_size: V.
    Returns:
      float32 (N, V): NEG_INF where the token would repeat an n-gram, else 0.
    """
    import tensorflow as tf  # here: the figures below serve TensorFlow-free callers too

    rows, steps = tf.shape(history)[0], tf.shape(history)[1]
    # Earlier n-grams: windows starting at j = 0 .. T-n; valid when j + n - 1 <= t - 1.
    windows = tf.signal.frame(history, n, 1, axis=1)  # (N, T-n+1, n)
    starts = tf.range(tf.shape(windows)[1])
    valid = starts <= t - n  # (T-n+1,)
    # The current (n-1)-token suffix: positions t-n+1 .. t-1 (clamped; invalid when t < n).
    suffix_at = tf.clip_by_value(t - n + 1 + tf.range(n - 1), 0, steps - 1)
    suffix = tf.gather(history, suffix_at, axis=1)  # (N, n-1)
    same = tf.reduce_all(tf.equal(windows[:, :, : n - 1], suffix[:, None, :]), axis=-1)
    match = tf.logical_and(same, valid[None, :])  # (N, T-n+1)
    banned = windows[:, :, n - 1]  # the token that followed each earlier (n-1)-gram
    row = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(banned))
    indices = tf.reshape(tf.stack([row, banned], axis=-1), [-1, 2])
    values = tf.reshape(tf.where(match, NEG_INF, 0.0), [-1])
    # min, not update: a token banned by one window and not by another stays banned.
    return tf.tensor_scatter_nd_min(tf.zeros([rows, vocab_size]), indices, values)


def teacher_block_mask(tokens: Any, n: int, vocab_size: int) -> Any:
    """`repeat_block_mask` at every position of whole captions: tokens (N, T) int32 ->
    float32 (N, T, V), position t's mask as decoding built it after tokens[:, :t]. What a
    teacher-forced pass over sampled captions adds to its logits to score each token
    under the distribution it was drawn from."""
    import tensorflow as tf

    masks = tf.map_fn(
        lambda t: repeat_block_mask(tokens, t, n, vocab_size),
        tf.range(tf.shape(tokens)[1]),
        fn_output_signature=tf.float32,
    )  # (T, N, V)
    return tf.transpose(masks, [1, 0, 2])


def has_repeated_ngram(tokens: Sequence[object], n: int = LOOP_NGRAM) -> bool:
    """True when some n consecutive tokens occur twice (overlaps count)."""
    seen = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def looping_figures(
    captions: Iterable[str], hit_max_length: Iterable[bool], n: int = LOOP_NGRAM
) -> dict[str, float | int]:
    """What shows looping in a set of captions (one per image):
    the share with a repeated n-gram, the share that ran to the length limit, and
    distinct captions per image (1.0: every image its own caption)."""
    captions = list(captions)
    at_limit = list(hit_max_length)
    images = len(captions)
    repeated = sum(has_repeated_ngram(c.split(), n) for c in captions)
    return {
        "images": images,
        f"repeated_{n}gram_share": repeated / images if images else 0.0,
        "at_length_limit_share": sum(map(bool, at_limit)) / images if images else 0.0,
        "distinct_captions_per_image": len(set(captions)) / images if images else 0.0,
    }
