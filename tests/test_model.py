import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.images.extractor import build_feature_extractor
from model.network.captioner import ShowAttendTell, combine_loss, loss_parts
from model.network.layers import AttentionGRUDecoder, BahdanauAttention, CNNEncoder
from model.text.vocab import END_ID, PAD_ID, START_ID

RNG = np.random.RandomState(0)


def features(batch: int, depth: int = 2048) -> np.ndarray:
    return RNG.rand(batch, 64, depth).astype(np.float32)


def test_extractor_outputs_64_locations_of_2048():
    extractor = build_feature_extractor("none")
    out = extractor(np.zeros((2, 299, 299, 3), np.uint8))
    assert out.shape == (2, 64, 2048) and out.dtype == tf.float32


def test_extractor_random_init_is_reproducible_across_processes(tmp_path):
    """`--weights none` features are computed by stage 1's workers and again by
    caption_images and model.caption in other processes: the seeded initialisation must
    give the same network everywhere, not only twice in one process."""
    import subprocess
    import sys

    x = RNG.randint(0, 256, (1, 299, 299, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    a = build_feature_extractor("none")(x).numpy()
    b = build_feature_extractor("none")(x).numpy()
    np.testing.assert_array_equal(a, b)
    code = (
        "import numpy as np; from model.images.extractor import build_feature_extractor; "
        f"x = np.load({str(tmp_path / 'x.npy')!r}); "
        f"np.save({str(tmp_path / 'y.npy')!r}, build_feature_extractor('none')(x).numpy())"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), a)


def test_missing_weights_file_fails_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        build_feature_extractor(str(tmp_path / "nope.weights.h5"))


@pytest.mark.parametrize(
    "layer",
    [
        CNNEncoder(16),
        BahdanauAttention(8),
        AttentionGRUDecoder(vocab_size=12, embedding_dim=16, units=8, dropout=0.1),
        ShowAttendTell(vocab_size=12, embedding_dim=16, units=8, attention_penalty=0.5),
    ],
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_keras_save_and_safe_load_reproduce_outputs(tmp_path):
    model = ShowAttendTell(vocab_size=12, embedding_dim=16, units=8)
    x = (features(3), np.array([[START_ID, 5, 6], [START_ID, 7, PAD_ID], [START_ID, 4, 4]]))
    logits, alphas = model(x)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    logits2, alphas2 = loaded(x)
    np.testing.assert_allclose(logits2, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alphas2, alphas, rtol=1e-6, atol=1e-6)
    assert loaded.config == model.config


def test_attention_weights_are_distributions_and_projection_happens_once():
    model = ShowAttendTell(vocab_size=12, embedding_dim=16, units=8)
    _, alphas = model((features(2), np.full((2, 5), 4)))
    np.testing.assert_allclose(np.sum(alphas, -1), 1.0, rtol=1e-5)
    # The teacher-forced graph calls W1 once per sequence, not once per step.
    calls = []
    original = model.decoder.attention.W1.call
    model.decoder.attention.W1.call = lambda x, **kw: calls.append(1) or original(x, **kw)
    model((features(2), np.full((2, 7), 4)))
    assert len(calls) == 1


def test_masked_loss_is_independent_of_padding_length():
    model = ShowAttendTell(vocab_size=12, embedding_dim=16, units=8)
    f = features(2)
    inputs = np.array([[START_ID, 5, 6, 7], [START_ID, 8, PAD_ID, PAD_ID]])
    targets = np.array([[5, 6, 7, END_ID], [8, END_ID, PAD_ID, PAD_ID]])
    losses = []
    for extra in (0, 3, 10):
        pad = ((0, 0), (0, extra))
        x, y = np.pad(inputs, pad), np.pad(targets, pad)
        logits, alphas = model((f, x))
        parts = loss_parts(logits, alphas, y)
        assert float(parts.tokens) == 6
        losses.append(float(combine_loss(parts, 1.0, parts.tokens)))
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


def test_attention_penalty_hand_computed():
    # One caption of 2 real steps + 1 pad step over 4 locations.
    alphas = np.array([[[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25]]], np.float32)
    targets = np.array([[5, END_ID, PAD_ID]])
    logits = np.zeros((1, 3, 6), np.float32)  # uniform: CE = log 6 per token
    parts = loss_parts(logits, alphas, targets)
    # coverage over real steps = [0.5, 1.0, 0.5, 0] -> (0.5^2 + 0 + 0.5^2 + 1^2) = 1.5
    assert float(parts.penalty) == pytest.approx(1.5)
    assert float(parts.cross_entropy) == pytest.approx(2 * np.log(6), rel=1e-6)
    assert float(combine_loss(parts, 0.0, 2.0)) == pytest.approx(np.log(6), rel=1e-6)
    assert float(combine_loss(parts, 2.0, 2.0)) == pytest.approx(np.log(6) + 1.5, rel=1e-6)


def test_tutorial_size_model_learns_on_random_features(tmp_path):
    """The done-criterion of the model core: build, train, save, reload, decode."""
    from model.decoding.decoders import greedy_decode

    model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
    optimizer = keras.optimizers.Adam(1e-3)
    f = features(8)
    tokens = RNG.randint(4, 5000, size=(8, 9))
    tokens[:, 0], tokens[:, -1] = START_ID, END_ID
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits, alphas = model((f, inputs), training=True)
            parts = loss_parts(logits, alphas, targets)
            loss = combine_loss(parts, 1.0, parts.tokens)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    losses = [float(step()) for _ in range(6)]
    assert losses[-1] < losses[0] * 0.9, losses
    model.save(tmp_path / "big.keras")
    loaded = keras.models.load_model(tmp_path / "big.keras", safe_mode=True)
    out = greedy_decode(loaded, f[:2], max_length=10)
    assert out.token_ids.shape == (2, 10)
    np.testing.assert_array_equal(out.token_ids, greedy_decode(model, f[:2], 10).token_ids)


def test_attention_equals_the_tutorials_formula():
    """score = V(tanh(W1 f + W2 h)), softmax over locations: the rewrite XLA can compile."""

    rng = np.random.RandomState(0)
    attention = BahdanauAttention(16)
    attention.build((None, None, 8), hidden_dim=16)
    features = rng.rand(3, 64, 8).astype(np.float32)
    hidden = rng.rand(3, 16).astype(np.float32)
    context, alpha = attention(features, attention.project(features), hidden)
    W1, W2, V = attention.W1, attention.W2, attention.V
    score = V(np.tanh(W1(features) + W2(hidden)[:, None, :]))  # (B, L, 1), Dense on rank 3
    expected_alpha = tf.nn.softmax(score, axis=1)
    np.testing.assert_allclose(alpha, expected_alpha[..., 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(context, tf.reduce_sum(expected_alpha * features, 1), rtol=1e-5)


def test_model_id_names_the_weights_not_the_save(tmp_path):
    """The same weights saved twice, seconds apart (the .keras zip records the save time),
    get one id; one changed weight or another decoding limit gets another."""
    import time

    from model.network.export import load_export, save_export
    from tests.fixtures import write_tiny_export

    first = load_export(write_tiny_export(str(tmp_path / "a")))
    time.sleep(2.1)
    again = load_export(write_tiny_export(str(tmp_path / "b")))
    assert first.model_id == again.model_id
    features = first.manifest["features"]
    save_export(again.model, again.vocab, features, str(tmp_path / "c"), max_length=6)
    assert load_export(str(tmp_path / "c")).model_id == first.model_id  # a re-export
    save_export(again.model, again.vocab, features, str(tmp_path / "d"), max_length=7)
    assert load_export(str(tmp_path / "d")).model_id != first.model_id
    weights = again.model.get_weights()
    weights[-1] = weights[-1] + 1e-3
    again.model.set_weights(weights)
    save_export(again.model, again.vocab, features, str(tmp_path / "e"), max_length=6)
    assert load_export(str(tmp_path / "e")).model_id != first.model_id
