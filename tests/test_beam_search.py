"""Beam search on toy models with hand-set weights, checked against brute force and greedy."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from model.decoding.beam_search import beam_search, length_penalty
from model.decoding.decoders import greedy_decode, make_decoder, to_decoded
from model.text.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from tests.test_decoding import forced_model

V = 8  # <pad> <unk> <start> <end> then words 4..7
A, B, C, D = 4, 5, 6, 7


def table(rows: dict[int, dict[int, float]]) -> np.ndarray:
    """Next-token probabilities per previous token; unlisted rows say <end>."""
    t = np.full((V, V), 1e-9)
    t[:, END_ID] = 1.0
    for prev, probs in rows.items():
        t[prev] = 1e-9
        for tok, p in probs.items():
            t[prev, tok] = p
    return t / t.sum(1, keepdims=True)


def toy_search(tables, k, max_length=5, alpha=0.0, banned=(PAD_ID, START_ID, UNK_ID)):
    """A bigram model per batch row (hand-set weights): state = (row, previous token)."""
    logits = tf.constant(np.log(np.maximum(np.stack(tables), 1e-30)), tf.float32)
    batch = len(tables)

    def step(tokens, row):
        return tf.gather_nd(logits, tf.stack([row, tokens], 1)), row, tf.zeros([tf.size(row), 1])

    rows = tf.repeat(tf.range(batch), k)
    out = beam_search(step, rows, batch, START_ID, END_ID, V, 1, k, max_length, alpha, banned)
    return {key: value.numpy() for key, value in out.items()}


def words(out, i):
    return out["token_ids"][i, : out["lengths"][i]].tolist()


# Greedy takes A (0.55), then the best next is only 0.2: P(A, <end>) = 0.11.
# B is less likely first but then ends for sure: P(B, <end>) = 0.45.
GREEDY_TRAP = table({START_ID: {A: 0.55, B: 0.45}, A: {END_ID: 0.2, C: 0.2, D: 0.2, B: 0.4}})


def test_beam_finds_the_more_probable_caption_that_greedy_misses():
    greedy = toy_search([GREEDY_TRAP], k=1)
    beam = toy_search([GREEDY_TRAP], k=2)
    assert words(greedy, 0) == [A, B]  # 0.55 * 0.4 * 1 = 0.22
    assert words(beam, 0) == [B]  # 0.45
    assert beam["log_probs"][0].sum() == pytest.approx(math.log(0.45), abs=1e-5)
    assert beam["log_probs"][0].sum() > greedy["log_probs"][0].sum()
    assert not beam["hit_max_length"][0]


def brute_force_best(t, max_length, alpha):
    """The best finished caption by exhaustive enumeration (no <unk>, <pad>, <start>)."""
    allowed = [i for i in range(V) if i not in (PAD_ID, START_ID, UNK_ID)]
    probs = t.copy()
    probs[:, [PAD_ID, START_ID, UNK_ID]] = 0
    probs /= probs.sum(1, keepdims=True)
    best = (-np.inf, None)
    for n in range(1, max_length + 1):
        for seq in itertools.product([a for a in allowed if a != END_ID], repeat=n - 1):
            tokens, prev, logp = [*seq, END_ID], START_ID, 0.0
            for tok in tokens:
                logp += math.log(probs[prev, tok])
                prev = tok
            score = logp / ((5 + n) / 6) ** alpha
            best = max(best, (score, seq))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_wide_beam_equals_exhaustive_search(seed, alpha):
    rng = np.random.RandomState(seed)
    t = rng.dirichlet(np.full(V, 0.5), size=V)
    out = toy_search([t], k=V**3, max_length=4, alpha=alpha)
    score, seq = brute_force_best(t, 4, alpha)
    assert words(out, 0) == list(seq)
    assert out["score"][0] == pytest.approx(score, rel=1e-4)
    n = len(seq) + 1
    assert out["score"][0] == pytest.approx(
        out["log_probs"][0].sum() / float(length_penalty(n, alpha)), rel=1e-5
    )


def test_a_longer_caption_that_scores_better_beats_an_early_short_one():
    # <end> right away (0.3) finishes first; A then <end> (0.5 * 0.9 = 0.45) is better.
    t = table({START_ID: {A: 0.5, END_ID: 0.3, B: 0.2}, A: {END_ID: 0.9, C: 0.1}})
    out = toy_search([t], k=2)
    assert words(out, 0) == [A]
    assert out["log_probs"][0].sum() == pytest.approx(math.log(0.45), abs=1e-5)


def test_length_penalty_prefers_longer_captions_as_alpha_grows():
    # (A, <end>) = 0.5 * 0.5 = 0.25 and (B, C, D, <end>) = 0.4 * 0.8 * 0.8 * 0.9 = 0.23
    t = table(
        {
            START_ID: {A: 0.5, B: 0.4, C: 0.1},
            A: {END_ID: 0.5, C: 0.5},
            B: {C: 0.8, END_ID: 0.2},
            C: {D: 0.8, END_ID: 0.2},
            D: {END_ID: 0.9, A: 0.1},
        }
    )
    assert words(toy_search([t], k=4, alpha=0.0), 0) == [A]
    assert words(toy_search([t], k=4, alpha=2.0), 0) == [B, C, D]


def test_no_hypothesis_finishing_returns_the_best_partial_one():
    never_ends = table({START_ID: {A: 0.6, B: 0.4}, A: {B: 0.9, A: 0.1}, B: {A: 0.7, B: 0.3}})
    never_ends[:, END_ID] = 0.0
    out = toy_search([never_ends], k=3, max_length=4)
    assert out["hit_max_length"][0]
    assert words(out, 0) == [A, B, A, B]  # 0.6 * 0.9 * 0.7 * 0.9, the most probable path
    assert out["lengths"][0] == 4 and END_ID not in out["token_ids"][0]


def test_rows_of_different_difficulty_decode_as_they_would_alone():
    ends_now = table({})
    never_ends = table({START_ID: {A: 1.0}, A: {A: 1.0}})
    never_ends[:, END_ID] = 0.0
    tables = [GREEDY_TRAP, ends_now, never_ends]
    together = toy_search(tables, k=3)
    for i, t in enumerate(tables):
        alone = toy_search([t], k=3)  # a batch of one
        for key in ("token_ids", "log_probs", "lengths", "hit_max_length", "score"):
            np.testing.assert_allclose(together[key][i], alone[key][0], rtol=1e-6, err_msg=key)
    assert words(together, 0) == [B] and words(together, 1) == [] and together["hit_max_length"][2]


def test_unk_is_not_produced_unless_allowed():
    t = table({START_ID: {UNK_ID: 0.7, A: 0.3}})
    assert words(toy_search([t], k=2), 0) == [A]
    assert words(toy_search([t], k=2, banned=(PAD_ID, START_ID)), 0) == [UNK_ID]


def test_beam_size_one_is_greedy_decoding_on_the_real_model():
    model = forced_model()
    rng = np.random.RandomState(0)
    feats = rng.randn(5, 64, 2048).astype(np.float32)
    feats[0, :, 0] = 1.0
    greedy = greedy_decode(model, feats, max_length=6)
    out = make_decoder(model, 6, beam_size=2, length_penalty=0.0, allow_unk=True)
    search1 = beam_search_on(model, feats, k=1)
    np.testing.assert_array_equal(search1.token_ids, greedy.token_ids)
    np.testing.assert_allclose(search1.log_probs, greedy.log_probs, atol=1e-5)
    np.testing.assert_allclose(search1.attention, greedy.attention, atol=1e-6)
    np.testing.assert_array_equal(search1.hit_max_length, greedy.hit_max_length)
    two = to_decoded(out(tf.constant(feats)))
    assert two.token_ids.shape == (5, 6) and two.attention.shape == (5, 6, 64)


def beam_search_on(model, feats, k):
    from model.decoding.decoders import beam_decode_graph

    # The decoding defaults: <unk> banned and trigrams blocked, as greedy_decode has them.
    fn = tf.function(lambda f: beam_decode_graph(model, f, 6, k, 0.0, block_repeats=3))
    return to_decoded(fn(tf.constant(feats)))


def test_attention_follows_the_chosen_hypothesis():
    """The attention maps returned are those of the chosen caption: teacher-forcing its
    tokens through the model gives the same maps, step by step."""
    import keras

    from model.network.captioner import ShowAttendTell

    keras.utils.set_random_seed(3)
    model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
    feats = np.random.RandomState(1).randn(4, 64, 2048).astype(np.float32)
    out = to_decoded(make_decoder(model, 6, beam_size=3)(tf.constant(feats)))
    for i in range(4):
        steps = out.lengths[i] + (0 if out.hit_max_length[i] else 1)
        tokens = np.array([[START_ID, *out.token_ids[i, : steps - 1]]], np.int32)
        logits, alphas = model((feats[i : i + 1], tokens))
        np.testing.assert_allclose(out.attention[i, :steps], alphas[0], atol=1e-5)
        assert np.all(out.attention[i, steps:] == 0)
        logp = tf.nn.log_softmax(logits[0] + never_mask(12)).numpy()
        chosen = out.token_ids[i, :steps]
        np.testing.assert_allclose(
            out.log_probs[i, :steps], logp[np.arange(steps), chosen], atol=1e-5
        )


def never_mask(v):
    mask = np.zeros(v, np.float32)
    mask[[PAD_ID, START_ID, UNK_ID]] = -1e9
    return mask
