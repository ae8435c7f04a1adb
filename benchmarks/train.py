"""Benchmark: the command-line trainer's pairs/s vs its bare compiled step and the matmul bound.

    python -m benchmarks.train [--images 160] [--batch_size 64] [--spe 10]

Writes feature shards (random features, 5 captions of 8-15 words per image,
a 5000-word vocabulary) and, for float32, bfloat16 and float32 with XLA, measures
in one run:
- bare: the compiled multi-step train function (`model.training.steps`) on one batch held
  in memory, with no input pipeline, host work or checkpoints: the bound for the loop,
  timed right before and right after each trainer run (the ratio uses their mean);
- `model.train --preset tutorial` itself, for each `--steps_per_execution`: the
  steady state is an epoch's pairs over the shortest epoch after the first (so
  model build, feature statistics and tracing drop out);
- the fraction of the machine's dense matmul FLOP/s (same dtype) that the model
  math reaches, which is where the remaining speed lies.
About eight minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

VOCAB = 5000


def matmul_flops(dtype: str, n: int = 2048, reps: int = 10) -> float:
    import tensorflow as tf

    a = tf.cast(tf.random.uniform((n, n)), dtype)
    f = tf.function(lambda x: tf.matmul(x, x))
    f(a).numpy()
    start = time.perf_counter()
    for _ in range(reps):
        f(a).numpy()
    return reps * 2 * n**3 / (time.perf_counter() - start)


def flops_per_pair(
    tokens: float, e: int = 256, u: int = 512, v: int = VOCAB, loc: int = 64, d: int = 2048
) -> float:
    """Forward + backward (x3) FLOPs of one teacher-forced pair with `tokens` decoder steps."""
    once = 2 * loc * d * e + 2 * loc * e * u  # encoder + attention projection, once per sequence
    per_step = (
        2 * u * u + 2 * loc * u + 2 * loc * e + 2 * (2 * e + u) * 3 * u + 2 * u * u + 2 * u * v
    )
    return 3 * (once + tokens * per_step)


def write_shards(folder: str, images: int) -> float:
    """A FEATURES_DIR with `images` images; returns the mean decoder steps per pair."""
    from model.images.extractor import features_identity
    from model.io import formats
    from model.text.vocab import RESERVED, Vocabulary

    rng = np.random.RandomState(0)
    words = [f"w{i}" for i in range(VOCAB - len(RESERVED))]
    Vocabulary((*RESERVED, *words)).save(os.path.join(folder, formats.VOCAB_FILE))
    import tensorflow as tf

    name = f"train-00000-of-00001{formats.SHARD_SUFFIX}"
    lengths = []
    with tf.io.TFRecordWriter(os.path.join(folder, name), options="GZIP") as w:
        for i in range(images):
            caps = [" ".join(rng.choice(words, rng.randint(8, 16))) for _ in range(5)]
            lengths += [len(c.split()) + 1 for c in caps]  # words + <end>
            feats = rng.rand(64, 2048).astype(np.float32)
            w.write(formats.make_example(i, f"{i}.jpg", feats, caps))
    split = {"images": images, "captions": 5 * images, "errors": 0, "shards": [name]}
    formats.write_manifest(
        os.path.join(folder, formats.MANIFEST_FILE),
        formats.KIND_FEATURES,
        {**features_identity("none"), "splits": {"train": split}, "vocab": {"size": VOCAB}},
    )
    return float(np.mean(lengths))


def bare_step(folder: str, batch_size: int, policy: str, jit: bool) -> Callable[[], float]:
    """A function measuring pairs/s of the compiled train steps on one in-memory batch.

    Built (and traced) once, so it can be timed right before and right after each
    trainer run: this shared machine's speed drifts within minutes.
    """
    import keras
    import tensorflow as tf

    from model.data.shards import caption_pairs, check_data_dir, split_info
    from model.network.captioner import ShowAttendTell
    from model.training.steps import make_step_fns, run_steps

    manifest, vocab = check_data_dir(folder)
    files = split_info(folder, manifest, "train").files
    batch = next(iter(caption_pairs(files, vocab, batch_size, length_multiple=4 if jit else 1)))
    keras.mixed_precision.set_global_policy(policy)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = ShowAttendTell(vocab_size=VOCAB, embedding_dim=256, units=512)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    fns = make_step_fns(strategy, model, optimizer, 1.0, clip_norm=5.0, jit_compile=jit)
    keras.mixed_precision.set_global_policy("float32")
    # The same batch again and again, with unknown batch and length dimensions as in training.
    ds = tf.data.Dataset.from_tensors(batch).repeat().unbatch()
    ds = ds.padded_batch(batch_size, padded_shapes=([64, 2048], [None])).prefetch(2)
    it = iter(strategy.experimental_distribute_dataset(ds))
    run_steps(fns.train, it, 3)  # trace and warm up

    def rate(steps: int = 6) -> float:
        start = time.perf_counter()
        totals = run_steps(fns.train, it, steps)
        return totals.pairs / (time.perf_counter() - start)

    return rate


class _EpochClock(io.StringIO):
    """A stdout that notes when each `train: epoch k/N` line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, text: str) -> int:
        if text.startswith("train: epoch "):
            self.times.append(time.perf_counter())
        return super().write(text)


def cli_rate(
    folder: str,
    model_dir: str,
    pairs: int,
    batch: int,
    spe: int,
    mixed: bool,
    jit: bool,
    epochs: int = 3,
) -> tuple[float, float]:
    """(steady pairs/s, start-up s) of `model.train` run in this process.

    The steady rate is one epoch's pairs over the shortest time between epoch lines
    after the first (whole epochs: data set-up and shuffle-buffer fill included;
    the shortest, since other load on a shared machine only ever slows an epoch);
    the start-up is the first epoch's excess over that (model build, statistics, tracing).
    """
    from model.train import run

    argv = ["--data_dir", folder, "--model_dir", model_dir, "--epochs", str(epochs)]
    argv += ["--batch_size", str(batch), "--steps_per_execution", str(spe), "--verbose", "2"]
    argv += ["--checkpoint_every", "100000", "--patience", "0", "--no_serving_export"]
    argv += ["--mixed_precision", "bfloat16"] if mixed else []
    argv += ["--jit_compile"] if jit else []
    clock = _EpochClock()
    start = time.perf_counter()
    with contextlib.redirect_stdout(clock):
        run(argv)
    ends = [start, *clock.times]
    epoch = float(np.min(np.diff(ends)[1:]))
    return pairs / epoch, ends[1] - start - epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=160, help="images (5 captions each) per epoch")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--spe", type=int, default=10, help="the larger --steps_per_execution")
    a = p.parse_args()
    from model.quiet import import_tensorflow

    import_tensorflow()  # without its start-up chatter
    # (policy, XLA, --steps_per_execution values)
    configs = [
        ("float32", False, [1, a.spe]),
        ("mixed_bfloat16", False, [1, a.spe]),
        ("float32", True, [a.spe]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "features")
        os.makedirs(data)
        tokens = write_shards(data, a.images)
        print(
            f"train: tutorial model (embedding 256, units 512, vocab {VOCAB}), global batch "
            f"{a.batch_size}, {5 * a.images} pairs per epoch, {tokens:.1f} decoder steps per pair"
        )
        peaks = {dtype: matmul_flops(dtype) for dtype in ("float32", "bfloat16")}
        for policy, jit, spes in configs:
            dtype = "float32" if policy == "float32" else "bfloat16"
            name = policy + (" XLA" if jit else "")
            peak = peaks[dtype]
            bare = bare_step(data, a.batch_size, policy, jit)
            before = bare()
            for spe in spes:
                steady, startup = cli_rate(
                    data,
                    os.path.join(tmp, f"m-{policy}-{jit}-{spe}"),
                    5 * a.images,
                    a.batch_size,
                    spe,
                    policy != "float32",
                    jit,
                )
                after = bare()
                bound = (before + after) / 2
                print(
                    f"  {name:14s} --steps_per_execution {spe:<3d} model.train {steady:5.1f} pairs/s, "
                    f"bare step {bound:5.1f}: ratio {steady / bound:.2f}; "
                    f"{steady * flops_per_pair(tokens) / peak:.2f} of {peak / 1e9:.0f} GFLOP/s "
                    f"{dtype} matmul (start-up {startup:.1f} s)"
                )
                before = after


if __name__ == "__main__":
    main()
