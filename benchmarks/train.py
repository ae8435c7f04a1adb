"""Benchmark: the command-line trainer's pairs/s vs its bare compiled step and the matmul bound.

    python -m benchmarks.train [--images 320] [--batch_size 64] [--spe 1,10]

Writes feature shards (random features, 5 captions of 8-15 words per image,
a 5000-word vocabulary) and, for float32 and bfloat16, measures in one run:
- bare: the compiled multi-step train function (`model.steps`) on one batch held
  in memory, with no input pipeline, host work or checkpoints: the bound for the loop;
- `model.train --preset tutorial` itself, for each `--steps_per_execution`: the
  steady state is an epoch's pairs over the shortest epoch after the first (so
  model build, feature statistics and tracing drop out);
- the fraction of the machine's dense matmul FLOP/s (same dtype) that the model
  math reaches, which is where the remaining speed lies.
Two to four minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

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
    from model import formats
    from model.extractor import features_identity
    from model.vocab import RESERVED, Vocabulary

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


def bare_rate(folder: str, batch_size: int, policy: str, steps: int = 10) -> float:
    """Pairs/s of the compiled train steps on one in-memory batch, `steps` per call (best of 3)."""
    import keras
    import tensorflow as tf

    from model.captioner import ShowAttendTell
    from model.data import caption_pairs, check_data_dir, split_info
    from model.steps import make_step_fns, run_steps

    manifest, vocab = check_data_dir(folder)
    batch = next(
        iter(caption_pairs(split_info(folder, manifest, "train").files, vocab, batch_size))
    )
    keras.mixed_precision.set_global_policy(policy)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = ShowAttendTell(vocab_size=VOCAB, embedding_dim=256, units=512)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    fns = make_step_fns(strategy, model, optimizer, 1.0, clip_norm=5.0)
    ds = tf.data.Dataset.from_tensors(batch).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))
    run_steps(fns.train, it, 3)  # trace and warm up
    rates = []
    for _ in range(3):  # the best of three: other load on a shared machine only slows a call
        start = time.perf_counter()
        totals = run_steps(fns.train, it, steps)
        rates.append(totals.pairs / (time.perf_counter() - start))
    keras.mixed_precision.set_global_policy("float32")
    return max(rates)


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
    folder: str, model_dir: str, pairs: int, batch: int, spe: int, mixed: bool, epochs: int = 4
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
    argv += ["--checkpoint_every", "100000", "--patience", "0"]
    argv += ["--mixed_precision", "bfloat16"] if mixed else []
    clock = _EpochClock()
    start = time.perf_counter()
    with contextlib.redirect_stdout(clock):
        run(argv)
    ends = [start, *clock.times]
    epoch = float(np.min(np.diff(ends)[1:]))
    return pairs / epoch, ends[1] - start - epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96, help="images (5 captions each) per epoch")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--spe", default="1,10", help="--steps_per_execution values to compare")
    a = p.parse_args()
    spes = [int(s) for s in a.spe.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "features")
        os.makedirs(data)
        tokens = write_shards(data, a.images)
        print(
            f"train: tutorial model (embedding 256, units 512, vocab {VOCAB}), global batch "
            f"{a.batch_size}, {5 * a.images} pairs per epoch, {tokens:.1f} decoder steps per pair"
        )
        for policy in ("float32", "mixed_bfloat16"):
            dtype = "float32" if policy == "float32" else "bfloat16"
            peak = matmul_flops(dtype)
            bare = bare_rate(data, a.batch_size, policy)
            frac = bare * flops_per_pair(tokens) / peak
            print(
                f"  {policy:15s} bare compiled step {bare:7.1f} pairs/s "
                f"({frac:.2f} of {peak / 1e9:.0f} GFLOP/s {dtype} matmul)"
            )
            for spe in spes:
                model_dir = os.path.join(tmp, f"m-{policy}-{spe}")
                steady, startup = cli_rate(
                    data, model_dir, 5 * a.images, a.batch_size, spe, policy != "float32"
                )
                print(
                    f"  {policy:15s} model.train --steps_per_execution {spe:<3d} steady "
                    f"{steady:7.1f} pairs/s: {steady / bare:.2f} of bare, "
                    f"{steady * flops_per_pair(tokens) / peak:.2f} of matmul "
                    f"(start-up {startup:.1f} s)"
                )


if __name__ == "__main__":
    main()
