import numpy as np
import pytest
import tensorflow as tf

from model.decoding.decoders import greedy_decode
from model.network.captioner import ShowAttendTell
from model.text.vocab import END_ID, PAD_ID, Vocabulary

WORD = 5


def forced_model() -> ShowAttendTell:
    """A model that says <end> at once when feature channel 0 is on, else WORD forever.

    encoder: channel 0 -> embedding dim 0; GRU: hidden_0 = tanh(10 * context_0);
    fc1 = identity; fc2: hidden_0 -> <end> logit 5, bias 1 on WORD.
    """
    m = ShowAttendTell(vocab_size=8, embedding_dim=4, units=4)
    enc_k = np.zeros((2048, 4), np.float32)
    enc_k[0, 0] = 1.0
    m.encoder.fc.set_weights([enc_k, np.zeros(4, np.float32)])
    gru = m.decoder.gru
    kernel = np.zeros(gru.kernel.shape, np.float32)  # (2E, 3U), gates z | r | h
    kernel[0, 2 * 4 + 0] = 10.0
    bias = np.zeros(gru.bias.shape, np.float32)
    bias[:, :4] = -20.0  # update gate ~0: the new state is the candidate
    gru.set_weights([kernel, np.zeros(gru.recurrent_kernel.shape, np.float32), bias])
    m.decoder.fc1.set_weights([np.eye(4, dtype=np.float32), np.zeros(4, np.float32)])
    fc2_k = np.zeros((4, 8), np.float32)
    fc2_k[0, END_ID] = 5.0
    fc2_b = np.zeros(8, np.float32)
    fc2_b[WORD] = 1.0
    m.decoder.fc2.set_weights([fc2_k, fc2_b])
    return m


def test_rows_stop_at_end_and_respect_max_length():
    feats = np.zeros((2, 64, 2048), np.float32)
    feats[0, :, 0] = 1.0  # row 0 ends immediately; row 1 never does
    out = greedy_decode(forced_model(), feats, max_length=6, block_repeats=0)
    assert out.token_ids[0].tolist() == [END_ID] + [PAD_ID] * 5
    assert out.token_ids[1].tolist() == [WORD] * 6
    assert out.lengths.tolist() == [0, 6]
    assert out.hit_max_length.tolist() == [False, True]
    assert np.all(out.log_probs[0, 1:] == 0) and out.log_probs[0, 0] < 0
    assert np.all(out.attention[0, 1:] == 0)
    np.testing.assert_allclose(out.attention[1].sum(-1), 1.0, rtol=1e-5)
    assert out.sequence_log_prob(0) == pytest.approx(float(out.log_probs[0, 0]))


def test_rows_that_end_leave_the_batch_and_the_others_keep_their_places():
    """Ended rows leave the decoding batch; what is written for every row is what it
    would be if they had stayed: <pad>, 0 and no attention after <end>, each row in
    its own place."""
    feats = np.zeros((5, 64, 2048), np.float32)
    ends = [True, False, True, False, False]
    for i, end in enumerate(ends):
        feats[i, :, 0] = 1.0 if end else 0.0
        feats[i, :, 1] = i  # a channel the model ignores: rows stay distinguishable
    out = greedy_decode(forced_model(), feats, max_length=6, block_repeats=0)
    going = greedy_decode(forced_model(), feats[[1, 3, 4]], max_length=6, block_repeats=0)
    for i, end in enumerate(ends):
        expected = [END_ID] + [PAD_ID] * 5 if end else [WORD] * 6
        assert out.token_ids[i].tolist() == expected
        assert out.hit_max_length[i] == (not end)
        if end:
            assert np.all(out.log_probs[i, 1:] == 0) and np.all(out.attention[i, 1:] == 0)
    np.testing.assert_array_equal(out.log_probs[[1, 3, 4]], going.log_probs)
    np.testing.assert_array_equal(out.attention[[1, 3, 4]], going.attention)


def test_all_rows_done_stops_the_batch():
    feats = np.zeros((3, 64, 2048), np.float32)
    feats[:, :, 0] = 1.0
    out = greedy_decode(forced_model(), feats, max_length=4)
    assert (out.token_ids[:, 0] == END_ID).all() and (out.token_ids[:, 1:] == PAD_ID).all()


def test_captions_are_decoded_with_the_vocabulary():
    vocab = Vocabulary(("<pad>", "<unk>", "<start>", "<end>", "a", "dog", "x", "y"))
    feats = np.zeros((2, 64, 2048), np.float32)
    feats[0, :, 0] = 1.0
    out = greedy_decode(forced_model(), feats, max_length=3, block_repeats=0)
    assert out.captions(vocab) == ["", "dog dog dog"]


def test_batch_equals_each_image_alone_and_is_deterministic():
    model = ShowAttendTell(vocab_size=30, embedding_dim=16, units=16)
    feats = np.random.RandomState(1).rand(6, 64, 2048).astype(np.float32)
    batch = greedy_decode(model, feats, max_length=12)
    again = greedy_decode(model, feats, max_length=12)
    np.testing.assert_array_equal(batch.token_ids, again.token_ids)
    for i in range(len(feats)):
        alone = greedy_decode(model, feats[i : i + 1], max_length=12)
        np.testing.assert_array_equal(alone.token_ids[0], batch.token_ids[i])
        assert alone.lengths[0] == batch.lengths[i]
        np.testing.assert_allclose(alone.log_probs[0], batch.log_probs[i], atol=1e-5)
    # Invariants: after <end> only <pad>; hit_max_length iff no <end>.
    for ids, length, hit in zip(batch.token_ids, batch.lengths, batch.hit_max_length, strict=False):
        has_end = END_ID in ids.tolist()
        assert hit == (not has_end)
        if has_end:
            assert ids[length] == END_ID and (ids[length + 1 :] == PAD_ID).all()


def test_pad_and_start_are_never_generated():
    m = forced_model()
    fc2_k, fc2_b = m.decoder.fc2.get_weights()
    fc2_b[:] = 0
    fc2_b[0], fc2_b[2] = 50.0, 40.0  # <pad> and <start> would win the argmax
    m.decoder.fc2.set_weights([np.zeros_like(fc2_k), fc2_b])
    out = greedy_decode(m, np.zeros((2, 64, 2048), np.float32), max_length=4, block_repeats=0)
    assert not np.isin(out.token_ids[:, 0], [0, 2]).any()
    assert (out.token_ids[:, 0] == END_ID).all()  # the first allowed id: <unk> is banned too


# ---------------------------------------------------------------- repeat blocking


def looping_model() -> ShowAttendTell:
    """Whatever the image, the same ranking every step: WORD, then 6, 7, 4, ..., <end> last.
    Greedy and beam search without blocking say WORD until the length limit."""
    m = forced_model()
    fc2_k, _ = m.decoder.fc2.get_weights()
    bias = np.zeros(8, np.float32)
    bias[[WORD, 6, 7, 4, 1]] = [5.0, 4.0, 3.0, 2.0, 1.0]
    bias[[PAD_ID, 2, END_ID]] = -5.0
    m.decoder.fc2.set_weights([np.zeros_like(fc2_k), bias])
    return m


def reference_block(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `history` (plain Python)."""
    if len(history) < n:
        return set()
    suffix = tuple(history[len(history) - n + 1 :])
    return {
        history[j + n - 1]
        for j in range(len(history) - n + 1)
        if tuple(history[j : j + n - 1]) == suffix
    }


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_repeat_block_mask_bans_exactly_the_tokens_that_repeat_an_ngram(n):
    import tensorflow as tf

    from model.text.ngrams import NEG_INF, repeat_block_mask

    rng = np.random.RandomState(n)
    steps, vocab = 12, 5
    history = rng.randint(0, 3, (40, steps)).astype(np.int32)  # 3 tokens: many repeats
    for t in range(steps + 1):
        prefix = np.where(np.arange(steps) < t, history, 0)  # as the decoders hold it
        mask = repeat_block_mask(tf.constant(prefix), tf.constant(t), n, vocab).numpy()
        for row in range(len(history)):
            want = reference_block(history[row, :t].tolist(), n)
            assert set(np.flatnonzero(mask[row] == NEG_INF)) == want, (row, t)
            assert set(np.unique(mask[row])) <= {0.0, NEG_INF}


@pytest.mark.parametrize("beam_size", [1, 3])
def test_blocking_ends_the_loop_of_a_model_that_loops(beam_size):
    import tensorflow as tf

    from model.decoding.decoders import make_decoder, to_decoded
    from model.text.ngrams import has_repeated_ngram

    feats = tf.zeros((2, 64, 2048))
    model = looping_model()

    def decode(block: int):
        fn = make_decoder(model, 10, beam_size=beam_size, allow_unk=True, block_repeats=block)
        return to_decoded(fn(feats))

    free = decode(0)
    assert free.token_ids[0].tolist() == [WORD] * 10  # the loop, as users saw it
    for n in (2, 3):
        blocked = decode(n)
        for row in range(2):
            words = blocked.words(row)
            assert not has_repeated_ngram(words, n), words
            assert words[:n] == [WORD] * n  # it is the same model: blocking starts late
        # The log-probs are the model's own: blocking removes choices, it does not rescale.
        first = blocked.log_probs[0, 0]
        assert first == pytest.approx(float(free.log_probs[0, 0]), abs=1e-6)


def test_looping_figures():
    from model.text.ngrams import looping_figures

    figures = looping_figures(
        ["a dog on a dog on a", "a cat", "a cat", "a small red circle above a small red square"],
        [True, False, False, False],
    )
    assert figures["repeated_3gram_share"] == pytest.approx(0.5)  # true captions repeat too
    assert figures["at_length_limit_share"] == pytest.approx(0.25)
    assert figures["distinct_captions_per_image"] == pytest.approx(0.75)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_unk_follows_one_rule_in_greedy_and_beam(beam_size):
    import tensorflow as tf

    from model.decoding.decoders import make_decoder, to_decoded
    from model.text.vocab import UNK_ID

    m = forced_model()
    fc2_k, _ = m.decoder.fc2.get_weights()
    bias = np.zeros(8, np.float32)
    # <unk> first, then a word; <end> never, so beam search returns its best live caption.
    bias[[UNK_ID, WORD, END_ID]] = [6.0, 3.0, -30.0]
    m.decoder.fc2.set_weights([np.zeros_like(fc2_k), bias])
    feats = tf.zeros((2, 64, 2048))
    for allow in (False, True):
        fn = make_decoder(m, 5, beam_size=beam_size, allow_unk=allow, block_repeats=0)
        ids = to_decoded(fn(feats)).token_ids
        assert (UNK_ID in ids) == allow, (allow, ids)


def test_sampling_draws_from_the_model_with_decodings_rules():
    """K captions per image in one graph call: first tokens follow the model's softmax
    over the allowed tokens, the same seed draws the same captions, blocking holds and
    log-probs are 0 after <end>."""
    import tensorflow as tf

    from model.decoding.decoders import sample_graph, to_decoded
    from model.text.ngrams import has_repeated_ngram

    model = looping_model()  # the same distribution every step, whatever the image
    feats = tf.zeros((250, 64, 2048))

    def draw(seed, block=3):
        fn = tf.function(
            lambda f, s: sample_graph(model, f, 8, samples=4, seed=s, block_repeats=block)
        )
        return to_decoded(fn(feats, tf.constant(seed, tf.int32)))

    out = draw([1, 2])
    assert out.token_ids.shape == (1000, 8)
    _, bias = model.decoder.fc2.get_weights()
    allowed = np.ones(8, bool)
    allowed[[PAD_ID, 1, 2]] = False  # <pad>, <unk>, <start>
    p = np.exp(bias - bias[allowed].max()) * allowed
    p /= p.sum()
    first = np.bincount(out.token_ids[:, 0], minlength=8) / 1000
    np.testing.assert_allclose(first, p, atol=0.04)
    np.testing.assert_array_equal(draw([1, 2]).token_ids, out.token_ids)
    assert (draw([3, 4]).token_ids != out.token_ids).any()
    for i in range(1000):
        assert not has_repeated_ngram(out.words(i), 3)
        n = out.lengths[i] + (0 if out.hit_max_length[i] else 1)
        assert (out.log_probs[i, :n] < 0).all() and (out.log_probs[i, n:] == 0).all()
    assert any(has_repeated_ngram(draw([1, 2], block=0).words(i), 3) for i in range(1000))


def test_each_row_draws_its_own_captions_whatever_share_of_the_batch_a_call_holds():
    """A worker that samples images 100..149 of a batch of 250 draws exactly the rows a
    call on the whole batch draws for them (and the share's position matters)."""
    import tensorflow as tf

    from model.decoding.decoders import sample_graph

    model = looping_model()
    feats = tf.zeros((250, 64, 2048))
    seed = tf.constant([5, 6], tf.int32)
    whole = sample_graph(model, feats, 8, 4, seed)["token_ids"].numpy()
    share = sample_graph(model, feats[100:150], 8, 4, seed, first_image=100, images=250)
    np.testing.assert_array_equal(share["token_ids"].numpy(), whole[400:600])
    elsewhere = sample_graph(model, feats[100:150], 8, 4, seed, first_image=0, images=250)
    assert (elsewhere["token_ids"].numpy() != whole[400:600]).any()


def test_inverse_cdf_draws_by_probability_and_never_a_token_without_any():
    import tensorflow as tf

    from model.decoding.decoders import inverse_cdf

    probs = tf.constant([[0.0, 0.25, 0.0, 0.75, 0.0]] * 4000)
    uniform = tf.constant((np.arange(4000) + 0.5) / 4000, tf.float32)
    counts = np.bincount(inverse_cdf(probs, uniform).numpy(), minlength=5)
    np.testing.assert_array_equal(counts, [0, 1000, 0, 3000, 0])
    # Round-off: probabilities summing below 1 and a uniform at the top of [0, 1).
    top = tf.constant([np.nextafter(np.float32(1), np.float32(0))])
    assert inverse_cdf(tf.constant([[0.3, 0.3, 0.3999, 0.0]]), top).numpy()[0] == 2


def test_a_teacher_forced_pass_masks_each_position_as_decoding_did():
    """After "a b c a b" the token c would repeat the trigram "a b c": banned at position
    5 only; position 0..4 and the one after "c" ban nothing new."""
    from model.text.ngrams import NEG_INF, teacher_block_mask

    a, b, c, d = 4, 5, 6, 7
    tokens = np.array([[a, b, c, a, b, d, c, 0]], np.int32)
    mask = teacher_block_mask(tokens, 3, 10).numpy()
    assert mask.shape == (1, 8, 10)
    banned = {(t, w) for t, w in zip(*np.nonzero(mask[0] == NEG_INF), strict=True)}
    assert banned == {(5, c)}


def test_sampling_keys_of_one_step_never_repeat_those_of_another():
    """The sampler keys time step t of step s by hashing t into (seed, s): with
    `[seed, s + t]`, step s's draws at time t were step s + 1's at time t - 1."""
    from model.decoding.decoders import step_seed

    keys = {
        tuple(step_seed(tf.constant([0, s], tf.int32), t).numpy())
        for s in range(20)
        for t in range(20)
    }
    assert len(keys) == 400
