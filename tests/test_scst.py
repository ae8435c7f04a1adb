"""Self-critical training: the baseline, the rewards, and the distributed policy step."""

import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.network.captioner import ShowAttendTell
from model.text.cider import CiderD
from model.text.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from model.training.cluster import replica_images
from model.training.reward import mean_of_others, score_samples, teacher_tokens
from model.training.self_critical import make_policy_step, token_log_probs
from tests.conftest import mirrored

SEED = tf.constant([0, 0], tf.int32)


def test_each_sample_is_judged_against_the_mean_of_the_others():
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    np.testing.assert_allclose(mean_of_others(rewards, 3), [2.5, 2.0, 1.5, 3.0, 3.0, 0.0])
    # Advantages of one image sum to zero: the baseline adds no bias, only less variance.
    advantages = rewards - mean_of_others(rewards, 3)
    np.testing.assert_allclose(advantages.reshape(2, 3).sum(axis=1), 0, atol=1e-12)
    np.testing.assert_array_equal(mean_of_others(rewards, 1), 0)


def test_rewards_are_cider_d_of_the_words_and_the_ending_and_the_greedy_baseline_is_per_image():
    refs = [[[5, 6, 7, 8, END_ID], [5, 6, 9, END_ID]], [[10, 11, 12, END_ID], [10, 11, 13, END_ID]]]
    df = CiderD.from_references(refs)
    # Two samples per image: words, `<end>`, `<pad>`; the last one ran to the limit.
    token_ids = np.array(
        [[5, 6, 7, 8, END_ID], [9, 9, END_ID, 0, 0], [10, 11, 12, END_ID, 0], [4, 4, 4, 4, 4]]
    )
    samples = {"token_ids": token_ids, "lengths": np.array([4, 2, 3, 5])}
    mean = score_samples(df, samples, refs, 2)
    candidates = [[5, 6, 7, 8, END_ID], [9, 9, END_ID], [10, 11, 12, END_ID], [4, 4, 4, 4, 4]]
    want = df.scores(candidates, [refs[0], refs[0], refs[1], refs[1]])
    np.testing.assert_allclose(mean.rewards, want)
    assert mean.rewards[0] > mean.rewards[1] and mean.rewards[2] > mean.rewards[3]
    np.testing.assert_allclose(mean.baselines, want[[1, 0, 3, 2]])
    greedy = {"token_ids": token_ids[[1, 3]], "lengths": np.array([2, 5])}
    by_greedy = score_samples(df, samples, refs, 2, greedy)
    np.testing.assert_allclose(by_greedy.baselines, want[[1, 1, 3, 3]])


def test_a_caption_cut_short_scores_below_the_same_words_ended_properly():
    """The bad-ending guard: the end token is an n-gram like any word."""
    refs = [[[5, 6, 7, END_ID], [8, 5, 6, 7, END_ID]]]
    df = CiderD.from_references(refs * 3 + [[[9, 10, END_ID]]])
    whole, cut = df.scores([[5, 6, 7, END_ID], [5, 6, END_ID]], refs * 2)
    assert whole > cut


def _samples(rng, n, length):
    ids = np.zeros((n, length), np.int32)
    for i in range(n):
        words = rng.randint(1, length)
        ids[i, :words] = rng.randint(4, 12, size=words)
        if words < length:
            ids[i, words] = END_ID
    return ids


def _reference_policy_steps(batches, clip_norm):
    """Plain Keras on one device: Adam with global_clipnorm on the whole batch."""
    keras.utils.set_random_seed(1)
    model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
    optimizer = keras.optimizers.Adam(1e-2, global_clipnorm=clip_norm)
    norms = []
    for feats, tokens, advantages in batches:
        with tf.GradientTape() as tape:
            logits, _ = model((feats, tokens[:, :-1]), training=False)
            log_probs = tf.nn.log_softmax(logits)
            targets = tokens[:, 1:]
            chosen = tf.gather(log_probs, targets, batch_dims=2)
            mask = tf.cast(targets != PAD_ID, tf.float32)
            loss = -tf.reduce_sum(advantages * tf.reduce_sum(chosen * mask, 1)) / tf.reduce_sum(
                mask
            )
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        norms.append(float(tf.linalg.global_norm(grads)))
        optimizer.apply(grads, model.trainable_variables)
    return model.get_weights(), norms


@pytest.mark.parametrize("devices", [["/cpu:0"], ["/cpu:0", "/cpu:1"]])
def test_policy_step_on_replicas_is_one_device_with_clipping(devices):
    """Sampled captions of unequal length (the replicas' token counts differ), odd
    batches of images (the replicas' image counts differ) and an active clip: N replicas,
    each with its own images' samples, give the update of plain Keras on the whole batch."""
    rng = np.random.RandomState(0)
    k, batches = 2, []
    for n in (3, 5, 4):
        tokens = teacher_tokens(_samples(rng, n * k, 6))
        assert (tokens[:, 0] == START_ID).all()
        feats = rng.rand(n, 64, 2048).astype(np.float32)
        batches.append((feats, tokens, 3 * rng.randn(n * k).astype(np.float32)))
    expected, norms = _reference_policy_steps(
        [(np.repeat(f, k, axis=0), t, a) for f, t, a in batches], clip_norm=0.05
    )
    assert min(norms) > 0.05 * len(devices)
    strategy = mirrored(*devices)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    step = make_policy_step(strategy, model, optimizer, k, clip_norm=0.05)
    assert step.share(5) == (0, 5)  # one worker holds every replica's images
    seen = np.zeros(5)
    for feats, tokens, advantages in batches:
        rewards = rng.rand(len(tokens))
        sums = step(len(feats), SEED, feats, tokens, advantages, rewards, rewards / 2)
        seen += sums
        np.testing.assert_allclose(sums[2:], [rewards.sum(), rewards.sum() / 2, len(tokens)])
    assert seen[1] == sum(float((t[:, 1:] != PAD_ID).sum()) for _, t, _ in batches)
    assert int(optimizer.iterations.numpy()) == 3
    for w, a, b in zip(model.weights, expected, model.get_weights(), strict=True):
        if w.path == "decoder/attention/V/bias":
            continue  # softmax ignores it: its gradient is round-off, which Adam normalises
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-5, err_msg=w.path)


def test_replicas_take_contiguous_images_and_the_last_may_have_none():
    assert replica_images(5, 2) == [(0, 3), (3, 5)]
    assert replica_images(13, 4) == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert replica_images(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_the_policy_pass_uses_the_models_dropout_unless_told_not_to():
    rng = np.random.RandomState(0)
    feats = rng.rand(3, 64, 2048).astype(np.float32)
    tokens = teacher_tokens(_samples(rng, 6, 6))
    advantages = rng.randn(6).astype(np.float32)
    weights = {}
    for dropout in (False, True):
        keras.utils.set_random_seed(1)
        model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8, dropout=0.5)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
        strategy = tf.distribute.get_strategy()
        step = make_policy_step(strategy, model, optimizer, 2, dropout=dropout)
        step(3, SEED, feats, tokens, advantages, advantages, advantages)
        weights[dropout] = model.get_weights()
    # The output layer's kernel: dropout acts on its input. (The embedding's plain-Keras
    # update is sparse, the step's dense.)
    kernel = [w.path for w in model.weights].index("decoder/fc2/kernel")
    # Without dropout, the update of the plain pass; with it, another one.
    reference = _reference_after_one_step(np.repeat(feats, 2, axis=0), tokens, advantages)
    np.testing.assert_allclose(weights[False][kernel], reference[kernel], rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights[True][kernel], weights[False][kernel])


def test_samples_are_scored_under_the_dropout_masks_that_drew_them():
    """On-policy with dropout: the sampler draws with masks that are a function of the
    seed, the time step and the row's place in the batch; the policy pass re-draws them,
    so each token's log-probability is the one it was drawn with, on any worker's share
    of the batch. Scored without them (a fresh draw or none), the gradient would be
    REINFORCE's for another policy."""
    from model.decoding.decoders import (
        banned_tokens,
        sample_graph,
        sample_rows,
        sequence_dropout_masks,
    )

    rng = np.random.RandomState(0)
    keras.utils.set_random_seed(1)
    model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8, dropout=0.5)
    feats = rng.rand(6, 64, 2048).astype(np.float32)
    seed = tf.constant([3, 7], tf.int32)
    # No repeat blocking: the sampler reports a blocked step's log-probabilities before
    # renormalising (it draws from the renormalised ones, as the policy pass scores them).
    whole = sample_graph(model, feats, 6, 2, seed, block_repeats=0, dropout=True)
    drawn = whole["log_probs"].numpy()[4:]  # images 2 .. 5: a second worker's share
    tokens = teacher_tokens(whole["token_ids"].numpy()[4:])
    never = np.zeros(12, np.float32)
    never[list(banned_tokens(allow_unk=False))] = -1e9
    rows, total = sample_rows(4, 2, 2, 6)
    masks = sequence_dropout_masks(model, seed, tokens.shape[1] - 1, rows, total)
    share = np.repeat(feats[2:], 2, axis=0)
    scored = token_log_probs(model, share, tokens, never, 0, masks).numpy()
    np.testing.assert_allclose(scored, drawn, atol=1e-5)
    unmasked = token_log_probs(model, share, tokens, never, 0, None).numpy()
    assert np.abs(unmasked - drawn).max() > 1e-2


def test_the_policy_pass_scores_tokens_under_the_distribution_they_were_drawn_from():
    """All samples below their baseline push their tokens down. Masked as the sampler
    masked them, the banned tokens (`<pad>`, `<unk>`, `<start>`) get none of the mass:
    their output weights do not move. Unmasked (before), they took it."""
    rng = np.random.RandomState(0)
    feats = rng.rand(3, 64, 2048).astype(np.float32)
    tokens = teacher_tokens(_samples(rng, 6, 6))
    losing = -np.ones(6, np.float32)
    banned = (PAD_ID, UNK_ID, START_ID)
    moved = {}
    for masked in (True, False):
        keras.utils.set_random_seed(1)
        model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
        optimizer = keras.optimizers.SGD(1.0)
        optimizer.build(model.trainable_variables)
        _, bias = model.decoder.fc2.get_weights()
        step = make_policy_step(
            tf.distribute.get_strategy(),
            model,
            optimizer,
            2,
            dropout=False,
            block_repeats=3,
            banned=banned if masked else (),
        )
        step(3, SEED, feats, tokens, losing, losing, losing * 0)
        moved[masked] = model.decoder.fc2.get_weights()[1] - bias
    assert np.abs(moved[True][list(banned)]).max() < 1e-6
    assert (moved[False][list(banned)] > 1e-3).all()
    assert (moved[True][4:] != 0).any()


def _reference_after_one_step(feats, tokens, advantages):
    """Plain Keras, one step, no dropout."""
    keras.utils.set_random_seed(1)
    model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8, dropout=0.5)
    with tf.GradientTape() as tape:
        logits, _ = model((feats, tokens[:, :-1]), training=False)
        chosen = tf.gather(tf.nn.log_softmax(logits), tokens[:, 1:], batch_dims=2)
        mask = tf.cast(tokens[:, 1:] != PAD_ID, tf.float32)
        loss = -tf.reduce_sum(advantages * tf.reduce_sum(chosen * mask, 1)) / tf.reduce_sum(mask)
    grads = tape.gradient(loss, model.trainable_variables)
    keras.optimizers.Adam(1e-2).apply(grads, model.trainable_variables)
    return model.get_weights()


# ---------------------------------------------------------------- the trainer's stage


def _scst_run(tmp_path, name, *extra):
    from tests.test_data_and_train import _train

    return _train(tmp_path, name, "--batch_size", "8", "--epochs", "1", *extra)


def test_cross_entropy_then_self_critical_in_one_command_and_a_larger_count_continues(tmp_path):
    from model.network.export import load_export
    from tests.fixtures import write_features_dir

    data = tmp_path / "f"
    write_features_dir(str(data), {"train": 24, "val": 8})  # 24 images: 12 steps of 2 x 5
    first = _scst_run(tmp_path, "m", "--scst_epochs", "1")
    assert (first["ce_epochs"], first["scst_epochs"]) == (1, 1)
    assert first["steps"] == 5 + 12
    scst_rows = [r for r in first["history"] if "scst_epoch" in r]
    assert len(scst_rows) == 1 and scst_rows[0]["samples"] == 24 * 5
    assert {"reward", "baseline", "val_cider"} <= set(scst_rows[0])
    assert first["scst"]["samples"] == 5 and first["scst"]["baseline"] == "mean"
    assert first["selected"]["phase"] in ("cross-entropy", "self-critical")
    # The reward's document frequencies are stored with the features, for the next run.
    assert len(list(data.glob("cider-df-train-*.npz"))) == 1
    again = _scst_run(tmp_path, "m", "--scst_epochs", "2")
    assert (again["ce_epochs"], again["scst_epochs"]) == (1, 2)
    assert again["steps"] == 5 + 2 * 12
    manifest = load_export(str(tmp_path / "m" / "export")).manifest
    assert manifest["training"]["scst_epochs"] == 2
    # The rate was pinned when the stage started: another is refused on resume.
    from model.io.formats import FormatError

    with pytest.raises(FormatError, match="--scst_learning_rate"):
        _scst_run(tmp_path, "m", "--scst_epochs", "3", "--scst_learning_rate", "1e-5")
    # A cross-entropy run does not pin the self-critical flags of a stage added later.
    _scst_run(tmp_path, "ce", "--scst_epochs", "0")
    later = _scst_run(tmp_path, "ce", "--scst_epochs", "1", "--scst_learning_rate", "1e-5")
    assert later["scst"]["learning_rate"] == 1e-5
    # Cross-entropy epochs cannot come after self-critical ones.
    with pytest.raises(FormatError, match="more --epochs cannot follow them"):
        _scst_run(tmp_path, "m", "--scst_epochs", "2", "--epochs", "2")


def test_self_critical_flags_that_cannot_work_are_refused_in_one_line(tmp_path):
    from tests.test_data_and_train import ENV, ROOT, train_cmd

    for flags, message in (
        (("--scst_samples", "1"), "--scst_samples >= 2"),
        (("--select_by", "loss"), "--select_by cider"),
    ):
        cmd = train_cmd(tmp_path, tmp_path / "m", "--scst_epochs", "1", *flags)
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert r.returncode != 0
        assert message in r.stderr.strip().splitlines()[-1]


def test_sigkill_mid_self_critical_epoch_resumes_to_the_same_weights(tmp_path):
    from tests.fixtures import write_features_dir
    from tests.test_data_and_train import ENV, ROOT, _export_weights, train_cmd

    # No val split, so no selection: the export is the last step's weights.
    write_features_dir(str(tmp_path / "f"), {"train": 24})
    flags = ("--batch_size", "8", "--epochs", "1", "--scst_epochs", "2", "--checkpoint_every", "3")
    cmd = train_cmd(tmp_path / "f", tmp_path / "m", *flags)
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    ckpt_dir = tmp_path / "m" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:  # CE ends at step 5; kill inside the first SCST epoch
        steps = [int(p.name.split("-")[1].split(".")[0]) for p in ckpt_dir.glob("ckpt-*.index")]
        if steps and max(steps) >= 9:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it was killed:\n" + proc.stdout.read().decode())
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "m" / "export").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "self-critical epoch 2/2" in r.stdout
    (line,) = [x for x in r.stdout.splitlines() if "self-critical epoch 2/2" in x]
    assert "reward" in line and "baseline" not in line  # the mean baseline is the reward
    whole = _scst_run(tmp_path, "whole", *flags[4:])
    assert whole["steps"] == 5 + 2 * 12
    for a, b in zip(
        _export_weights(tmp_path / "m"), _export_weights(tmp_path / "whole"), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_the_stage_starts_from_the_best_epoch_the_checkpoint_keeps(tmp_path):
    """The best cross-entropy epoch's weights are part of the checkpoint: the stage's
    start reads no file that only the chief writes (another worker can see it stale,
    half-written or not at all). Here the file is gone before the stage starts; the
    run still ends as one that never stopped."""
    from tests.fixtures import write_features_dir
    from tests.test_data_and_train import _export_weights

    write_features_dir(str(tmp_path / "f"), {"train": 24, "val": 8})
    flags = ("--epochs", "3", "--patience", "0", "--learning_rate", "3e-2")
    whole = _scst_run(tmp_path, "whole", *flags, "--scst_epochs", "1")
    assert not whole["history"][2].get("selected")  # the best epoch is not the last
    _scst_run(tmp_path, "m", *flags, "--scst_epochs", "0")
    for left in (tmp_path / "m").glob("*.weights.h5"):
        left.unlink()
    _scst_run(tmp_path, "m", *flags, "--scst_epochs", "1")
    for a, b in zip(
        _export_weights(tmp_path / "m"), _export_weights(tmp_path / "whole"), strict=True
    ):
        np.testing.assert_array_equal(a, b)
