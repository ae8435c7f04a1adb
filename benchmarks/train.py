"""Benchmark: training examples/s for the tutorial-size model vs the machine's matmul FLOP/s.

    python -m benchmarks.train [--steps 20] [--batch_size 64]

Generates feature shards (random features, captions of 8-15 words), runs the
trainer's distributed step on them, and prints image-caption pairs per second,
the model FLOPs that implies, and the fraction of dense float32 matmul FLOP/s
measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n))
    f = tf.function(lambda x: tf.matmul(x, x))
    f(a).numpy()
    start = time.perf_counter()
    for _ in range(reps):
        f(a).numpy()
    return reps * 2 * n**3 / (time.perf_counter() - start)


def flops_per_pair(
    tokens: float, e: int = 256, u: int = 512, v: int = 5000, loc: int = 64, d: int = 2048
) -> float:
    """Forward + backward (x3) FLOPs of one teacher-forced pair with `tokens` decoder steps."""
    once = 2 * loc * d * e + 2 * loc * e * u  # encoder + attention projection, once per sequence
    per_step = (
        2 * u * u + 2 * loc * u + 2 * loc * e + 2 * (2 * e + u) * 3 * u + 2 * u * u + 2 * u * v
    )
    return 3 * (once + tokens * per_step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64)
    a = p.parse_args()
    import keras
    import tensorflow as tf

    from model import formats
    from model.captioner import ShowAttendTell
    from model.data import caption_pairs
    from model.train import make_step_fns
    from model.vocab import RESERVED, Vocabulary

    rng = np.random.RandomState(0)
    words = [f"w{i}" for i in range(5000 - len(RESERVED))]
    vocab = Vocabulary((*RESERVED, *words))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train-00000-of-00001.tfrecord.gz")
        images = (a.steps + 3) * a.batch_size // 5 + 1
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for i in range(images):
                caps = [" ".join(rng.choice(words, rng.randint(8, 16))) for _ in range(5)]
                w.write(
                    formats.make_example(i, f"{i}.jpg", rng.rand(64, 2048).astype(np.float32), caps)
                )
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
            opt = keras.optimizers.Adam(1e-3, global_clipnorm=5.0)
            opt.build(model.trainable_variables)
        fns = make_step_fns(strategy, model, opt, 1.0)
        ds = strategy.experimental_distribute_dataset(
            caption_pairs([path], vocab, a.batch_size, drop_remainder=True)
        )
        it = iter(ds)
        for _ in range(3):  # trace for a few lengths
            fns.train(next(it))
        tokens, pairs = 0.0, 0
        start = time.perf_counter()
        for _ in range(a.steps):
            batch = next(it)
            _, n = fns.train(batch)
            tokens += float(n)
            pairs += a.batch_size
        seconds = time.perf_counter() - start
    rate = pairs / seconds
    achieved = rate * flops_per_pair(tokens / pairs)
    peak = matmul_flops()
    print(
        f"train: {rate:.1f} pairs/s (batch {a.batch_size}, tutorial size), {achieved / 1e9:.1f} GFLOP/s of "
        f"model math vs {peak / 1e9:.1f} GFLOP/s dense matmul: fraction {achieved / peak:.2f}"
    )


if __name__ == "__main__":
    main()
