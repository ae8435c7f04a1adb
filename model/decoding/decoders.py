"""Batched decoding, compiled into one graph call per batch: greedy, or beam search.

Greedy: each row stops at `<end>` and leaves the batch (the steps after cost only the
rows still decoding); the whole batch stops when every row is done or `max_length`
tokens were produced. Deterministic (argmax, no sampling).
Both block repeated n-grams (`block_repeats`, trigrams by default; `model.text.ngrams`).
Beam search (`model.decoding.beam_search`) keeps K hypotheses per row; beam size 1 is
greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from model.decoding.beam_search import beam_search
from model.defaults import DEFAULT_BLOCK_REPEATS
from model.network.captioner import ShowAttendTell
from model.text.ngrams import repeat_block_mask
from model.text.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary


@dataclass(frozen=True)
class DecodedBatch:
    """Greedy decoding results for a batch, as numpy arrays.

    Attributes:
      token_ids: (B, max_length) generated ids; `<end>` included, `<pad>` after it.
      log_probs: (B, max_length) log-probability of each generated token, 0 after `<end>`.
      lengths: (B,) number of words, i.e. tokens before `<end>`.
      hit_max_length: (B,) True where no `<end>` came within `max_length` steps.
      attention: (B, max_length, L) attention weights of each step.
    """

    token_ids: np.ndarray
    log_probs: np.ndarray
    lengths: np.ndarray
    hit_max_length: np.ndarray
    attention: np.ndarray

    def words(self, i: int) -> list[int]:
        return [int(t) for t in self.token_ids[i, : self.lengths[i]]]

    def sequence_log_prob(self, i: int) -> float:
        """Log-probability of the words and the closing `<end>` (if produced)."""
        return float(self.log_probs[i].sum())

    def captions(self, vocab: Vocabulary) -> list[str]:
        return [vocab.decode(self.words(i)) for i in range(len(self.lengths))]


def banned_tokens(allow_unk: bool) -> tuple[int, ...]:
    """Never generated: `<pad>`, `<start>` and, unless allowed, `<unk>` (greedy and beam)."""
    return (PAD_ID, START_ID) if allow_unk else (PAD_ID, START_ID, UNK_ID)


def greedy_decode_graph(
    model: ShowAttendTell,
    features: tf.Tensor,
    max_length: int,
    block_repeats: int = 0,
    allow_unk: bool = False,
    choose: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    step_masks: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None,
) -> dict[str, tf.Tensor]:
    """The graph body: features (B, L, D) -> dict of decoded tensors (see `DecodedBatch`).

    With `block_repeats` n > 0, a token that would repeat an n-gram of the caption
    is never chosen (`model.text.ngrams`). `choose(log_probs (B, V), t) -> tokens (B,)`
    picks each step's token: argmax by default (greedy); `sample_graph` draws.
    `step_masks(t)`: step t's dropout masks (`dropout_masks`), none by default."""
    batch = tf.shape(features)[0]
    encoded, projected = model.encode(features)
    decoder = model.decoder
    num_locations = tf.shape(features)[1]

    vocab_size = model.config.vocab_size
    # Greedy decoding drops the rows whose caption has ended: in a batch of 32 the longest
    # caption sets the steps, and the others are done after 0.6 of them (Flickr8k), so
    # the steps after cost only the rows still decoding. At least two rows stay: the
    # CPU's matmul kernel for a single row rounds differently from the batched one, and
    # a row's caption must not depend on the rows beside it. (The sampler keeps every
    # row: its draws are made by row.)
    drop_done = choose is None and step_masks is None

    def cond(t, rows, token, hidden, done, history, enc, proj, ended, ids, logps, alphas):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(ended)))

    # Banned tokens are never valid outputs: masked out of the softmax.
    banned = banned_tokens(allow_unk)
    never = tf.scatter_nd([[i] for i in banned], [-1e9] * len(banned), [model.config.vocab_size])

    def body(t, rows, token, hidden, done, history, enc, proj, ended, ids, logps, alphas):
        masks = None if step_masks is None else step_masks(t)
        logits, hidden, alpha = decoder.step(token, hidden, enc, proj, masks)
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32) + never)
        if block_repeats:
            log_probs += repeat_block_mask(history, t, block_repeats, vocab_size)
        if choose is None:
            next_token = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
        else:
            next_token = choose(log_probs, t)
        next_logp = tf.gather(log_probs, next_token, batch_dims=1)
        next_token = tf.where(done, PAD_ID, next_token)
        next_logp = tf.where(done, 0.0, next_logp)
        alpha = tf.where(done[:, None], 0.0, tf.cast(alpha, tf.float32))
        done = tf.logical_or(done, tf.equal(next_token, END_ID))
        history += tf.one_hot(t, max_length, dtype=tf.int32)[None] * next_token[:, None]
        at = rows[:, None]  # rows that left the batch get <pad>, 0 and no attention
        ids = ids.write(t, tf.scatter_nd(at, next_token, [batch]))
        logps = logps.write(t, tf.scatter_nd(at, next_logp, [batch]))
        alphas = alphas.write(t, tf.scatter_nd(at, alpha, [batch, num_locations]))
        ended = tf.tensor_scatter_nd_update(ended, at, done)
        state = (rows, next_token, hidden, done, history, enc, proj)
        if drop_done:
            going = tf.logical_not(done)
            going = tf.where(tf.reduce_sum(tf.cast(going, tf.int32)) >= 2, going, True)
            stay = tf.where(going)[:, 0]
            state = tf.cond(  # copies only on the steps where rows leave
                tf.size(stay) < tf.size(rows),
                lambda: tuple(tf.gather(x, stay) for x in state),
                lambda: state,
            )
        return (t + 1, *state, ended, ids, logps, alphas)

    loop_vars = (
        tf.constant(0),
        tf.range(batch),  # the rows still in the batch
        tf.fill([batch], START_ID),
        decoder.initial_state(batch),
        tf.zeros([batch], tf.bool),
        tf.zeros([batch, max_length], tf.int32),  # the tokens so far, for repeat blocking
        encoded,
        projected,
        tf.zeros([batch], tf.bool),  # every row of the batch: has its caption ended
        tf.TensorArray(tf.int32, size=0, dynamic_size=True),
        tf.TensorArray(tf.float32, size=0, dynamic_size=True),
        tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None]),
    )
    rows_first = [tf.TensorShape([None]).concatenate(x.shape[1:]) for x in loop_vars[1:8]]
    invariants = (
        tf.TensorShape([]),
        *rows_first,
        loop_vars[8].shape,
        *(tf.TensorShape(None) for _ in range(3)),
    )
    steps, *_, ended, ids, logps, alphas = tf.while_loop(
        cond, body, loop_vars, shape_invariants=invariants, maximum_iterations=max_length
    )

    def stacked(ta: tf.TensorArray, empty_shape: list) -> tf.Tensor:
        # (steps, B, ...) -> (B, max_length, ...), padded with zeros (= <pad>).
        x = tf.cond(steps > 0, ta.stack, lambda: tf.zeros(empty_shape, ta.dtype))
        x = tf.transpose(x, tf.concat([[1, 0], tf.range(2, tf.rank(x))], 0))
        pad = [[0, 0], [0, max_length - steps]] + [[0, 0]] * (len(empty_shape) - 2)
        return tf.pad(x, pad)

    token_ids = stacked(ids, [0, batch])
    is_word = tf.logical_and(tf.not_equal(token_ids, END_ID), tf.not_equal(token_ids, PAD_ID))
    return {
        "token_ids": token_ids,
        "log_probs": stacked(logps, [0, batch]),
        "lengths": tf.reduce_sum(tf.cast(is_word, tf.int32), axis=1),
        "hit_max_length": tf.logical_not(ended),
        "attention": stacked(alphas, [0, batch, num_locations]),
    }


def step_seed(seed: tf.Tensor, t: tf.Tensor | int) -> tf.Tensor:
    """Time step t's key from a call's `seed` (2,): hashed (`stateless_fold_in`), so the
    keys of different calls never line up (`[seed, step + t]` made step s's draws at
    time t those of step s + 1 at time t - 1)."""
    return tf.random.experimental.stateless_fold_in(seed, t)


def dropout_masks(
    model: ShowAttendTell, seed: tf.Tensor, t: tf.Tensor, rows: tf.Tensor, total_rows: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Time step t's dropout masks for `rows` of a batch of `total_rows`: (n, E) on the
    word embedding and (n, U) before the output layer, scaled by 1 / (1 - rate) as Keras
    scales them. A function of (seed, t, row) alone: the sampler and the teacher-forced
    pass that scores its samples draw the same masks, on any split of the batch."""
    rate = model.config.dropout
    key = step_seed(seed, t)

    def keep(size: int, which: int) -> tf.Tensor:
        u = tf.random.stateless_uniform(
            [total_rows, size], tf.random.experimental.stateless_fold_in(key, which)
        )
        return tf.cast(tf.gather(u, rows) >= rate, tf.float32) / (1.0 - rate)

    return keep(model.config.embedding_dim, 1), keep(model.config.units, 2)


def sequence_dropout_masks(
    model: ShowAttendTell, seed: tf.Tensor, steps: tf.Tensor, rows: tf.Tensor, total_rows: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """`dropout_masks` of time steps 0 .. steps - 1 for a teacher-forced pass:
    (n, steps, E) and (n, steps, U)."""
    embed, out = tf.map_fn(
        lambda t: dropout_masks(model, seed, t, rows, total_rows),
        tf.range(steps),
        fn_output_signature=(tf.float32, tf.float32),
    )
    return tf.transpose(embed, [1, 0, 2]), tf.transpose(out, [1, 0, 2])


def sample_rows(
    batch: tf.Tensor, samples: int, first_image: tf.Tensor | int, images: tf.Tensor | int | None
) -> tuple[tf.Tensor, tf.Tensor]:
    """(rows, total_rows): the places in the whole batch of the K samples of images
    first_image .. first_image + batch - 1, and the whole batch's row count."""
    total_rows = (batch if images is None else images) * samples
    return first_image * samples + tf.range(batch * samples), total_rows


def sample_graph(
    model: ShowAttendTell,
    features: tf.Tensor,
    max_length: int,
    samples: int,
    seed: tf.Tensor,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
    allow_unk: bool = False,
    first_image: tf.Tensor | int = 0,
    images: tf.Tensor | int | None = None,
    dropout: bool = False,
) -> dict[str, tf.Tensor]:
    """`samples` captions per image drawn from the model (multinomial sampling, as
    self-critical training does), in one graph call: features (B, L, D) -> the tensors of
    `DecodedBatch` for B * samples rows (image b's at b*K .. b*K+K-1), with greedy decoding's
    `<end>` handling, banned tokens and repeat blocking; log-probs are 0 after `<end>`.

    `seed` (2,) int32 makes the draws reproducible, and each row's draws are its own: the
    features may be images `first_image` .. `first_image + B - 1` of a batch of `images`
    (default B), and those rows are the rows a call on the whole batch draws. So each
    worker of a distributed run samples only its share of the batch, and the captions do
    not depend on how the batch is split. (Each step draws one uniform per row of the
    whole batch, stateless from `step_seed(seed, t)`, and inverts each row's distribution
    at it.) With `dropout`, the model samples with its dropout on, each step's masks
    drawn by `dropout_masks`, the same way."""
    batch = tf.shape(features)[0]
    features = tf.repeat(features, samples, axis=0)
    rows, total_rows = sample_rows(batch, samples, first_image, images)

    def draw(log_probs: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        uniform = tf.gather(tf.random.stateless_uniform([total_rows], step_seed(seed, t)), rows)
        return inverse_cdf(tf.exp(log_probs), uniform)

    def masks(t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return dropout_masks(model, seed, t, rows, total_rows)

    with_masks = masks if dropout and model.config.dropout > 0 else None
    return greedy_decode_graph(
        model, features, max_length, block_repeats, allow_unk, draw, step_masks=with_masks
    )


def inverse_cdf(probs: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
    """probs (B, V) rows of a distribution (zeros allowed), uniform (B,) in [0, 1) -> (B,)
    the token whose cumulative-probability interval holds each row's uniform: a draw from
    each row. A zero-probability token has an empty interval, so it is never drawn (the
    round-off of the sum included)."""
    cdf = tf.math.cumsum(probs, axis=-1)
    drawn = tf.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], side="right")[:, 0]
    vocab = tf.shape(probs)[1]
    last = vocab - 1 - tf.argmax(tf.reverse(probs > 0, [1]), axis=1, output_type=tf.int32)
    return tf.minimum(tf.cast(drawn, tf.int32), last)


def beam_decode_graph(
    model: ShowAttendTell,
    features: tf.Tensor,
    max_length: int,
    beam_size: int,
    length_penalty: float = 0.0,
    allow_unk: bool = False,
    block_repeats: int = 0,
) -> dict[str, tf.Tensor]:
    """Beam search (`model.decoding.beam_search`): features (B, L, D) -> DecodedBatch tensors."""
    batch = tf.shape(features)[0]
    encoded, projected = model.encode(features)
    encoded = tf.repeat(encoded, beam_size, axis=0)  # row b's beams at b*K .. b*K+K-1
    projected = tf.repeat(projected, beam_size, axis=0)
    decoder = model.decoder

    def step(tokens: tf.Tensor, hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return decoder.step(tokens, hidden, encoded, projected)

    out = beam_search(
        step,
        decoder.initial_state(batch * beam_size),
        batch,
        START_ID,
        END_ID,
        model.config.vocab_size,
        tf.shape(features)[1],
        beam_size,
        max_length,
        length_penalty,
        banned=banned_tokens(allow_unk),
        block_repeats=block_repeats,
    )
    out.pop("score")
    return out


def decode_graph(
    model: ShowAttendTell,
    features: tf.Tensor,
    max_length: int,
    beam_size: int = 1,
    length_penalty: float = 0.0,
    allow_unk: bool = False,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
) -> dict[str, tf.Tensor]:
    """Greedy decoding for beam_size 1, else beam search; both block repeated n-grams of
    size `block_repeats` (0: off)."""
    if beam_size == 1:
        return greedy_decode_graph(model, features, max_length, block_repeats, allow_unk)
    return beam_decode_graph(
        model, features, max_length, beam_size, length_penalty, allow_unk, block_repeats
    )


def make_decoder(
    model: ShowAttendTell,
    max_length: int,
    beam_size: int = 1,
    length_penalty: float = 0.0,
    allow_unk: bool = False,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
) -> tf.types.experimental.ConcreteFunction:
    """A tf.function over features of any batch size: one graph call per batch."""
    feature_shape = list(model.config.feature_shape)

    @tf.function(input_signature=[tf.TensorSpec([None, *feature_shape], tf.float32)])
    def decode(features: tf.Tensor) -> dict[str, tf.Tensor]:
        return decode_graph(
            model, features, max_length, beam_size, length_penalty, allow_unk, block_repeats
        )

    return decode


def make_greedy_decoder(
    model: ShowAttendTell, max_length: int, block_repeats: int = DEFAULT_BLOCK_REPEATS
) -> tf.types.experimental.ConcreteFunction:
    """A tf.function over features of any batch size: one graph call per batch."""
    return make_decoder(model, max_length, block_repeats=block_repeats)


def to_decoded(outputs: dict[str, tf.Tensor]) -> DecodedBatch:
    return DecodedBatch(**{k: np.asarray(v) for k, v in outputs.items()})


def greedy_decode(
    model: ShowAttendTell,
    features: np.ndarray,
    max_length: int,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
) -> DecodedBatch:
    """Convenience wrapper: decode a numpy batch with a freshly traced function."""
    decode = make_greedy_decoder(model, max_length, block_repeats)
    return to_decoded(decode(tf.convert_to_tensor(features, tf.float32)))
