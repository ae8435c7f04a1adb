import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.data.shards import caption_pairs, check_data_dir, split_info
from model.decoding.decoders import greedy_decode
from model.io.formats import FormatError
from model.network.captioner import ShowAttendTell, combine_loss, loss_parts
from model.network.export import load_export
from model.text.vocab import END_ID, PAD_ID, START_ID, standardize
from model.training.steps import make_step_fns, run_steps
from tests.conftest import mirrored
from tests.fixtures import caption_for, write_features_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}


def test_batches_are_cut_to_longest_caption(tmp_path):
    vocab = write_features_dir(str(tmp_path), {"train": 10}, shards=2)
    manifest, _ = check_data_dir(str(tmp_path))
    info = split_info(str(tmp_path), manifest, "train")
    batches = list(caption_pairs(info.files, vocab, batch_size=4, shuffle=False))
    assert sum(int(t.shape[0]) for _, t in batches) == info.captions == 15
    for feats, tokens in batches:
        assert feats.dtype == tf.float16 and feats.shape[1:] == (64, 2048)
        t = tokens.numpy()
        assert (t[:, 0] == START_ID).all()
        lengths = (t != PAD_ID).sum(1)
        assert lengths.max() == t.shape[1]  # no column of pure padding
        for row, n in zip(t, lengths, strict=True):
            assert row[n - 1] == END_ID
            assert vocab.decode(row) in {standardize(caption_for(i)) for i in range(12)}


def test_shuffle_is_deterministic_per_seed(tmp_path):
    """One seed, one order; another seed, another order of the same pairs."""
    vocab = write_features_dir(str(tmp_path), {"train": 12})
    info = split_info(str(tmp_path), check_data_dir(str(tmp_path))[0], "train")

    def pairs(**kwargs) -> list[tuple[float, tuple[int, ...]]]:
        out = []
        for f, t in caption_pairs(info.files, vocab, 4, **kwargs):
            sums = f.numpy().astype(np.float64).sum(axis=(1, 2))  # one per image
            rows = [tuple(x for x in row if x) for row in t.numpy().tolist()]  # no padding
            out += [(round(s, 2), row) for s, row in zip(sums, rows, strict=True)]
        return out

    a, b, other = pairs(seed=3), pairs(seed=3), pairs(seed=4)
    assert a == b
    assert other != a and sorted(other) == sorted(a) == sorted(pairs(shuffle=False))


def test_bad_data_dir_fails_with_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.train",
            "--data_dir",
            str(tmp_path / "nope"),
            "--model_dir",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: --data_dir does not exist")


def _batch(rng, lengths):
    tokens = np.zeros((len(lengths), max(lengths)), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, 0] = START_ID
        tokens[i, 1 : n - 1] = rng.randint(4, 12, size=n - 2)
        tokens[i, n - 1] = END_ID
    return rng.rand(len(lengths), 64, 2048).astype(np.float32), tokens


def _reference_adam_steps(batches, clip_norm, attention_penalty):
    """Plain Keras on one device, no strategy: Adam with global_clipnorm on the whole batch."""
    keras.utils.set_random_seed(1)
    model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
    optimizer = keras.optimizers.Adam(1e-2, global_clipnorm=clip_norm)
    norms = []
    for feats, tokens in batches:
        with tf.GradientTape() as tape:
            logits, alphas = model((feats, tokens[:, :-1]), training=True)
            parts = loss_parts(logits, alphas, tokens[:, 1:])
            loss = combine_loss(parts, attention_penalty, parts.tokens)
        # Dense, as the trainer's: Keras's sparse path for the embedding is not Adam's update.
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        norms.append(float(tf.linalg.global_norm(grads)))
        optimizer.apply(grads, model.trainable_variables)
    return model.get_weights(), norms


def _distributed(strategy, batches):
    """An iterator over `batches` with unknown batch and length, as training sees them."""
    spec = (tf.TensorSpec([None, 64, 2048], tf.float32), tf.TensorSpec([None, None], tf.int32))
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec)
    return iter(strategy.experimental_distribute_dataset(ds))


@pytest.mark.parametrize("devices", [["/cpu:0"], ["/cpu:0", "/cpu:1"]])
def test_replicas_update_as_one_device_with_clipping(devices):
    """N replicas with Adam and an active global-norm clip equal plain Keras on the whole batch."""
    rng = np.random.RandomState(0)
    # Replicas get different real-token counts; several steps let Adam's state matter.
    batches = [_batch(rng, lengths) for lengths in ([3, 7, 4, 6], [5, 3, 8, 4], [6, 6, 3, 7])]
    expected, norms = _reference_adam_steps(batches, clip_norm=0.05, attention_penalty=0.5)
    assert min(norms) > 0.05 * len(devices)  # clipping is active on every step, and per
    # replica clipping (each half's norm against 0.05) would give another update
    strategy = mirrored(*devices)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    fns = make_step_fns(strategy, model, optimizer, attention_penalty=0.5, clip_norm=0.05)
    totals = run_steps(fns.train, _distributed(strategy, batches), 10)
    assert totals.steps == 3 and totals.pairs == 12
    assert int(optimizer.iterations.numpy()) == 3
    for w, a, b in zip(model.weights, expected, model.get_weights(), strict=True):
        if w.path == "decoder/attention/V/bias":
            continue  # softmax ignores it: its gradient is round-off, which Adam normalises
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=w.path)


def train_cmd(data, model_dir, *extra):
    return [
        sys.executable,
        "-m",
        "model.train",
        "--data_dir",
        str(data),
        "--model_dir",
        str(model_dir),
        "--preset",
        "tiny",
        "--batch_size",
        "4",
        "--warmup_steps",
        "1",
        "--verbose",
        "2",
        "--no_serving_export",  # the end-to-end test builds and checks it
        *extra,
    ]


def test_train_loss_falls_exports_and_decodes(tmp_path):
    from model.train import run

    write_features_dir(str(tmp_path / "f"), {"train": 24, "val": 6})
    summary = run(
        [
            "--data_dir",
            str(tmp_path / "f"),
            "--model_dir",
            str(tmp_path / "m"),
            "--preset",
            "tiny",
            "--epochs",
            "4",
            "--batch_size",
            "6",
            "--learning_rate",
            "1e-2",
            "--warmup_steps",
            "2",
            "--verbose",
            "0",
            "--patience",
            "0",
            "--no_serving_export",  # built and checked by test_serving and test_gcs
        ]
    )
    history = summary["history"]
    losses, ces = [h["loss"] for h in history], [h["ce"] for h in history]
    # The attention penalty adds a near-constant offset, so a 10% fall is real learning.
    assert losses[-1] < losses[0] * 0.9, losses
    assert ces[-1] < ces[0] * 0.9, ces  # the cross-entropy alone falls too
    assert all(h["ce"] < h["loss"] and h["val_ce"] < h["val_loss"] for h in history)
    assert summary["steps"] == 4 * summary["steps_per_epoch"]
    export = load_export(str(tmp_path / "m" / "export"))
    assert export.manifest["features"]["weights"] == "none"
    assert export.manifest["training"]["steps"] == summary["steps"]
    assert os.listdir(tmp_path / "m" / "logs")  # TensorBoard events
    out = greedy_decode(export.model, np.random.rand(2, 64, 2048).astype(np.float32), 5)
    assert out.token_ids.shape == (2, 5)


def test_checkpoint_of_another_model_fails_at_start(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 8})
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"vocab_size": 999}))
    r = subprocess.run(
        train_cmd(tmp_path / "f", tmp_path / "m"), capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert r.returncode != 0
    assert "holds a checkpoint of another model" in r.stderr.strip().splitlines()[-1]


def test_sigkill_mid_epoch_then_resume_reaches_same_step_count(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 60})  # 90 captions -> 23 steps/epoch
    cmd = train_cmd(tmp_path / "f", tmp_path / "m", "--epochs", "3", "--checkpoint_every", "2")
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    ckpt_dir = tmp_path / "m" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ckpt_dir.exists() and any(
            p.name.startswith("ckpt-") and p.name.endswith(".index") for p in ckpt_dir.iterdir()
        ):
            steps = [int(p.name.split("-")[1].split(".")[0]) for p in ckpt_dir.glob("ckpt-*.index")]
            if max(steps) >= 4:
                break
        if proc.poll() is not None:
            pytest.fail(
                "training finished before it could be killed:\n" + proc.stdout.read().decode()
            )
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "m" / "export").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    manifest = load_export(str(tmp_path / "m" / "export")).manifest
    assert manifest["training"]["steps"] == 3 * 23
    # The same weights as a run never killed (dropout's random state resumes too).
    whole = _train(tmp_path, "whole", "--epochs", "3", "--checkpoint_every", "2")
    assert whole["steps"] == 3 * 23
    resumed, whole = _export_weights(tmp_path / "m"), _export_weights(tmp_path / "whole")
    for a, b in zip(resumed, whole, strict=True):
        np.testing.assert_array_equal(a, b)


def _run_ok(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_a_corrupt_or_unlisted_checkpoint_is_not_a_restart_from_zero(tmp_path):
    """The newest checkpoint's data garbled: a warning and the one before it. The
    `checkpoint` index garbled: the files themselves are found. Never step 0 again."""
    write_features_dir(str(tmp_path / "f"), {"train": 16})  # 24 captions -> 6 steps/epoch
    flags = ("--checkpoint_every", "2", "--steps_per_execution", "1")
    ckpt_dir = tmp_path / "m" / "checkpoints"
    _run_ok(train_cmd(tmp_path / "f", tmp_path / "m", "--epochs", "1", *flags))
    steps = sorted(int(p.name[5:-6]) for p in ckpt_dir.glob("ckpt-*.index"))
    assert steps[-2:] == [4, 6]
    for data in ckpt_dir.glob("ckpt-6.data-*"):
        data.write_bytes(b"\0garbage" * 1000)
    r = _run_ok(train_cmd(tmp_path / "f", tmp_path / "m", "--epochs", "2", *flags))
    assert "checkpoint" in r.stderr and "ckpt-6 is unreadable" in r.stderr
    assert "resumed from" in r.stdout and "ckpt-4 at step 4" in r.stdout
    assert load_export(str(tmp_path / "m" / "export")).manifest["training"]["steps"] == 12
    (ckpt_dir / "checkpoint").write_text("not {{ a checkpoint state")
    r = _run_ok(train_cmd(tmp_path / "f", tmp_path / "m", "--epochs", "3", *flags))
    assert "ckpt-12 at step 12" in r.stdout
    assert load_export(str(tmp_path / "m" / "export")).manifest["training"]["steps"] == 18


def test_two_trainers_cannot_share_a_model_dir(tmp_path):
    from model.training.checkpoints import _LOCKS, lock_model_dir

    write_features_dir(str(tmp_path / "f"), {"train": 4})
    lock_model_dir(str(tmp_path / "m"))  # this process plays the trainer already running
    try:
        r = subprocess.run(
            train_cmd(tmp_path / "f", tmp_path / "m"),
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            timeout=600,
        )
    finally:
        os.close(_LOCKS.pop(str(tmp_path / "m")))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'm'} is in use by another trainer (pid {os.getpid()}); "
        "wait for it or use another --model_dir"
    )


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from model.train import parse_args

    argv = ["--data_dir", "d", "--model_dir", "m"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert parse_args(argv).verbose == 2  # logs get one line per epoch
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert parse_args(argv).verbose == 1
    assert parse_args([*argv, "--verbose", "0"]).verbose == 0


def _train(tmp_path, name, *extra):
    """model.train in this process, with train_cmd's flags (a repeated flag: the last wins)."""
    from model.train import run

    return run(train_cmd(tmp_path / "f", tmp_path / name, "--verbose", "0", *extra)[3:])


def _export_weights(model_dir):
    return load_export(str(model_dir / "export")).model.get_weights()


def test_steps_per_execution_trains_exactly_like_one_step_per_call(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 20, "val": 4})  # 30 captions: 8 steps
    one = _train(tmp_path, "one", "--epochs", "2", "--steps_per_execution", "1")
    many = _train(tmp_path, "many", "--epochs", "2", "--steps_per_execution", "3")
    assert one["steps"] == many["steps"] == 16
    for a, b in zip(one["history"], many["history"], strict=True):
        assert a["pairs"] == b["pairs"] == 30
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    for a, b in zip(
        _export_weights(tmp_path / "one"), _export_weights(tmp_path / "many"), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch_size", "6"),
        ("--seed", "1"),
        ("--mixed_precision", "bfloat16"),
        ("--max_tokens", "9"),
    ],
)
def test_resume_with_a_changed_data_or_numerics_flag_fails_naming_it(tmp_path, flag, value):
    from model.io.formats import FormatError

    write_features_dir(str(tmp_path / "f"), {"train": 8})
    _train(tmp_path, "m", "--epochs", "1")
    with pytest.raises(FormatError, match=f"resume with the same {flag}"):
        _train(tmp_path, "m", "--epochs", "2", flag, value)


def test_resume_after_finishing_keeps_the_whole_history(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 8})
    first = _train(tmp_path, "m", "--epochs", "2")
    again = _train(tmp_path, "m", "--epochs", "2")  # nothing left to do: re-export only
    assert again["history"] == first["history"] and len(again["history"]) == 2
    history = load_export(str(tmp_path / "m" / "export")).manifest["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_encoder_is_finite_under_mixed_precision_with_constant_channels(policy):
    from model.network.layers import CNNEncoder

    keras.mixed_precision.set_global_policy(policy)
    try:
        encoder = CNNEncoder(8, name="encoder")
        encoder.build((None, 64, 2048))
        variance = np.full(2048, 0.04, np.float32)
        variance[100:400] = 0.0  # never varied in the training images
        encoder.set_feature_stats(np.zeros(2048, np.float32), variance)
        feats = np.full((2, 64, 2048), 0.01, np.float32)  # a small serve-time activation
        out = encoder(feats)
        assert out.dtype == policy.split("_")[1]
        assert np.isfinite(np.asarray(out, np.float32)).all()
        # The floored scale keeps 0.01 on a constant channel small (no 1e6 blow-up).
        standardized = encoder.standardize(feats).numpy()
        assert standardized.dtype == np.float32 and np.abs(standardized).max() < 10
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_mixed_precision_trains_to_finite_losses(tmp_path, precision):
    write_features_dir(
        str(tmp_path / "f"), {"train": 16, "val": 4}, constant_channels=slice(100, 400)
    )
    try:
        summary = _train(tmp_path, "m", "--epochs", "2", "--mixed_precision", precision)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert summary["policy"] == f"mixed_{precision}"
    for h in summary["history"]:
        assert all(np.isfinite(h[k]) for k in ("loss", "ce", "val_loss", "val_ce")), h
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    export = load_export(str(tmp_path / "m" / "export"))  # float32 export, finite decoding
    out = greedy_decode(export.model, np.random.rand(2, 64, 2048).astype(np.float32), 5)
    assert np.isfinite(out.log_probs).all()


def test_train_step_is_traced_once_for_many_caption_lengths(tmp_path):
    words = ["a", "red", "blue", "green", "circle", "square", "left", "right", "on", "the"]

    def captions(i):  # 2 to 19 words: 18 lengths
        return [" ".join(words[j % len(words)] for j in range(2 + i % 18))]

    vocab = write_features_dir(str(tmp_path / "f"), {"train": 36}, captions=captions)
    info = split_info(str(tmp_path / "f"), check_data_dir(str(tmp_path / "f"))[0], "train")
    strategy = mirrored("/cpu:0", "/cpu:1")
    with strategy.scope():
        model = ShowAttendTell(vocab_size=len(vocab), embedding_dim=8, units=8)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    fns = make_step_fns(strategy, model, optimizer, attention_penalty=1.0, clip_norm=1.0)
    lengths = set()
    for epoch in range(2):  # a new dataset and iterator every epoch, as in training
        ds = caption_pairs(info.files, vocab, 3, seed=epoch)
        lengths |= {int(t.shape[1]) for _, t in ds}
        it = iter(strategy.experimental_distribute_dataset(ds))
        while run_steps(fns.train, it, 4).steps == 4:
            pass
        run_steps(fns.evaluate, iter(strategy.experimental_distribute_dataset(ds)), 100)
    assert len(lengths) >= 8  # many padded lengths went through the same trace
    assert fns.train.experimental_get_tracing_count() == 1
    assert fns.evaluate.experimental_get_tracing_count() == 1


def test_xla_buckets_round_lengths_up_to_a_multiple_of_8(tmp_path):
    vocab = write_features_dir(str(tmp_path / "f"), {"train": 12})
    info = split_info(str(tmp_path / "f"), check_data_dir(str(tmp_path / "f"))[0], "train")
    plain = list(caption_pairs(info.files, vocab, 4, shuffle=False))
    bucketed = list(caption_pairs(info.files, vocab, 4, shuffle=False, length_multiple=8))
    for (_, a), (_, b) in zip(plain, bucketed, strict=True):
        assert b.shape[1] % 8 == 0 and b.shape[1] - a.shape[1] < 8
        np.testing.assert_array_equal(b[:, : a.shape[1]], a)  # only <pad> was added
        assert not b.numpy()[:, a.shape[1] :].any()


def test_jit_compile_trains_like_the_graph_step(tmp_path):
    """XLA compiles forward and backward (the decoder loop's gradient included)."""
    write_features_dir(str(tmp_path / "f"), {"train": 12})
    # Without dropout: XLA pads captions to buckets, which changes the dropout masks.
    graph = _train(tmp_path, "graph", "--epochs", "1", "--dropout", "0")
    xla = _train(tmp_path, "xla", "--epochs", "1", "--jit_compile", "--dropout", "0")
    assert xla["steps"] == graph["steps"] == 5
    (a,), (b,) = graph["history"], xla["history"]
    assert b["pairs"] == a["pairs"] == 18
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)  # padding to a bucket is masked


def test_overflowing_step_is_skipped_and_the_loss_scale_halved():
    from model.training.steps import DynamicLossScale

    rng = np.random.RandomState(0)
    batches = [_batch(rng, [3, 7, 4, 6]), _batch(rng, [5, 3, 8, 4])]
    batches[0][0][3, 5, 7] = np.inf  # one replica's gradient overflows (as float16 would)
    strategy = mirrored("/cpu:0", "/cpu:1")
    with strategy.scope():
        model = ShowAttendTell(vocab_size=12, embedding_dim=8, units=8)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    before = [w.copy() for w in model.get_weights()]
    scale = DynamicLossScale(initial=1024.0, growth_steps=2)
    fns = make_step_fns(strategy, model, optimizer, 0.5, clip_norm=1.0, loss_scale=scale)
    it = _distributed(strategy, batches)
    assert run_steps(fns.train, it, 1).steps == 1
    assert float(scale.scale.numpy()) == 512.0  # halved, and the step skipped on every replica
    assert int(optimizer.iterations.numpy()) == 0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    run_steps(fns.train, it, 1)  # finite: applied, and one good step counted
    assert int(optimizer.iterations.numpy()) == 1 and int(scale.good_steps.numpy()) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_per_replica_batch_size_sets_the_global_batch(tmp_path):
    from model.train import parse_args, run

    write_features_dir(str(tmp_path / "f"), {"train": 8})  # 12 captions
    argv = ["--data_dir", str(tmp_path / "f"), "--model_dir", str(tmp_path / "m")]
    flags = ["--preset", "tiny", "--epochs", "1", "--per_replica_batch_size", "5"]
    summary = run([*argv, *flags, "--no_serving_export"])
    assert summary["global_batch"] == 5 * summary["replicas"] == 5  # one replica in-process
    assert summary["steps"] == 3 and summary["history"][0]["pairs"] == 12
    with pytest.raises(SystemExit):  # one or the other
        parse_args([*argv, "--batch_size", "8", "--per_replica_batch_size", "2"])


def test_the_export_is_the_epoch_with_the_best_val_cider(tmp_path):
    from model.evaluation.metrics import cider
    from model.evaluation.report import decode_split

    write_features_dir(str(tmp_path / "f"), {"train": 20, "val": 6})
    summary = _train(tmp_path, "m", "--epochs", "3", "--patience", "0")
    history = summary["history"]
    assert summary["selected_by"] == "cider" and len(history) == 3
    assert all(0 <= h["val_loops"] <= 1 for h in history)
    assert summary["best_val"] == pytest.approx(max(h["val_cider"] for h in history))
    # The exported weights score exactly that: they are the best epoch's.
    export = load_export(str(tmp_path / "m" / "export"))
    manifest, _ = check_data_dir(str(tmp_path / "f"))
    files = split_info(str(tmp_path / "f"), manifest, "val").files
    decoded = decode_split(export.model, export.vocab, files, 8, export.max_length)
    ids = decoded["image_id"]
    refs = dict(zip(ids, decoded["references"], strict=True))
    preds = dict(zip(ids, decoded["caption"], strict=True))
    assert cider(refs, preds) == pytest.approx(summary["best_val"], abs=1e-6)


def test_resume_refuses_another_vocabulary_in_one_line(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 8})
    _train(tmp_path, "m", "--epochs", "1")
    vocab = tmp_path / "f" / "vocab.txt"
    tokens = vocab.read_text().splitlines()
    tokens[4], tokens[5] = tokens[5], tokens[4]  # same size, other order: other word ids
    vocab.write_text("\n".join(tokens) + "\n")
    with pytest.raises(FormatError, match="trained on a vocabulary other than"):
        _train(tmp_path, "m", "--epochs", "2")


def test_more_epochs_on_resume_keep_the_learning_rate_continuous(tmp_path):
    from model.train import parse_args
    from model.training.run import set_up

    write_features_dir(str(tmp_path / "f"), {"train": 8})
    _train(tmp_path, "m", "--epochs", "2", "--warmup_steps", "0")

    def rate_after_restore(epochs: str) -> float:
        argv = train_cmd(tmp_path / "f", tmp_path / "m", "--epochs", epochs, "--verbose", "0")
        run = set_up(parse_args([*argv[3:], "--warmup_steps", "0"]))
        return float(run.optimizer.learning_rate.numpy())

    before = rate_after_restore("2")
    assert before == pytest.approx(1e-3 * 0.1, rel=1e-3)  # the end of the cosine decay
    assert rate_after_restore("4") == pytest.approx(before, rel=1e-6)


def test_shards_that_disagree_with_the_manifest_fail_in_one_line(tmp_path):
    """A manifest that promises more caption pairs than its shards hold (a FEATURES_DIR
    mended by hand, or written by an older extractor killed mid-way) stops training at
    the end of the first epoch with one line, instead of training on part of the data."""
    write_features_dir(str(tmp_path / "f"), {"train": 8})
    path = tmp_path / "f" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["captions"] += 40
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="hold 12 caption pairs, the manifest says 52"):
        _train(tmp_path, "m", "--epochs", "1")


def test_a_finished_run_started_again_writes_nothing(tmp_path, capsys):
    """The same command after the run finished: the export is this run's end already, so
    it is not written again (nor, with one, the serving model rebuilt)."""
    write_features_dir(str(tmp_path / "f"), {"train": 8, "val": 4})
    first = _train(tmp_path, "m", "--epochs", "1")
    manifest = tmp_path / "m" / "export" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    again = _train(tmp_path, "m", "--epochs", "1")
    assert "exported already; nothing to do" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == written
    assert again["steps"] == first["steps"] and again["history"] == first["history"]
    more = _train(tmp_path, "m", "--epochs", "2")  # more epochs: a new export
    assert more["steps"] > first["steps"] and manifest.stat().st_mtime_ns != written
