"""Benchmark: a self-critical step against a cross-entropy step, and the reward's speed.

    python -m benchmarks.scst [--export MODEL_DIR/export --data_dir FEATURES_DIR]
        [--batch_size 64] [--samples 5] [--steps 10]

Measured in one run, on one global batch of `--batch_size` sequences:
- CE: the compiled cross-entropy train step (`model.training.steps`), teacher forcing
  on `batch_size` image-caption pairs;
- SCST: `ceil(batch_size / K)` images x K samples: the sampling call, the CIDEr-D
  rewards (NumPy, `model.text.cider`), the policy-gradient step; and with the greedy
  baseline, its greedy call too. The table gives each part's share and the step's
  ratio to the CE step;
- rewards/s: CIDEr-D of 5,000 candidates against 5 references each, in one call, and
  pycocoevalcap's scorer on the same captions (its Python loop) for the ratio.
With `--export` and `--data_dir` the model and features are real (a trained model ends
its captions; an untrained one samples every caption to the length limit, the worst
case); without them the tutorial model is untrained, on random features.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object], steps: int) -> float:
    """Seconds per call, after one warm-up call (tracing)."""
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def zipf_sentences(rng: np.random.Generator, n: int, vocab: int, length=(8, 15)) -> list:
    ranks = np.arange(4, vocab)
    p = 1.0 / (ranks - 3)
    p /= p.sum()
    return [list(rng.choice(ranks, size=rng.integers(*length), p=p)) for _ in range(n)]


def rewards_per_second(vocab: int, candidates: int = 5000) -> tuple[float, float]:
    """(our CIDEr-D, pycocoevalcap's CiderScorer) captions per second."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    from model.text.cider import CiderD

    rng = np.random.default_rng(0)
    refs = [zipf_sentences(rng, 5, vocab) for _ in range(candidates)]
    cands = zipf_sentences(rng, candidates, vocab)
    df = CiderD.from_references(refs)
    ours = candidates / timed(lambda: df.scores(cands, refs), 2)
    words = [" ".join(map(str, c)) for c in cands]
    ref_words = [[" ".join(map(str, r)) for r in rs] for rs in refs]

    def theirs() -> None:
        scorer = CiderScorer(n=4, sigma=6.0)
        for c, rs in zip(words, ref_words, strict=True):
            scorer += (c, rs)
        scorer.compute_score()

    return ours, candidates / timed(theirs, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", help="a trained MODEL_DIR/export (default: untrained)")
    p.add_argument("--data_dir", help="FEATURES_DIR for --export's features")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    from model.quiet import import_tensorflow

    tf = import_tensorflow()
    import keras

    from model.defaults import DEFAULT_MAX_LENGTH, PRESETS
    from model.network.captioner import ShowAttendTell
    from model.text.cider import CiderD
    from model.training.reward import score_samples, teacher_tokens
    from model.training.self_critical import compiled_calls
    from model.training.steps import make_step_fns, run_steps

    rng = np.random.default_rng(0)
    k, batch = args.samples, args.batch_size
    images = math.ceil(batch / k)
    strategy = tf.distribute.get_strategy()
    if args.export:
        from model.data.shards import check_data_dir, image_batches, split_info
        from model.network.export import load_export

        export = load_export(args.export)
        model, vocab_size, max_length = export.model, len(export.vocab), export.max_length
        manifest, vocab = check_data_dir(args.data_dir)
        info = split_info(args.data_dir, manifest, "val")
        first = next(iter(image_batches(info.files, max(images, batch), seed=0)))
        features = first["features"].numpy()
        references = [
            [vocab.encode(c.decode(), add_markers=False) for c in refs]
            for refs in first["captions"].to_list()
        ]
        what = f"trained ({args.export})"
    else:
        vocab_size, max_length = 5000, DEFAULT_MAX_LENGTH
        keras.utils.set_random_seed(0)
        preset = PRESETS["tutorial"]
        model = ShowAttendTell(vocab_size, preset["embedding_dim"], preset["units"])
        features = rng.standard_normal((max(images, batch), 64, 2048)).astype(np.float32)
        references = [zipf_sentences(rng, 5, vocab_size) for _ in range(len(features))]
        what = "untrained tutorial model, random features"
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    scst_optimizer = keras.optimizers.Adam(1e-5)
    scst_optimizer.build(model.trainable_variables)

    # Cross-entropy: `batch` pairs of 12-word captions.
    tokens = np.zeros((batch, 14), np.int32)
    tokens[:, 0], tokens[:, 1:13], tokens[:, 13] = 2, rng.integers(4, vocab_size, (batch, 12)), 3
    ce_fns = make_step_fns(strategy, model, optimizer, attention_penalty=1.0, clip_norm=5.0)
    ds = tf.data.Dataset.from_tensors((features[:batch], tokens)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    ce = timed(lambda: run_steps(ce_fns.train, iterator, 1), args.steps)

    # Self-critical: sample, reward, update.
    df = CiderD.from_references(references)
    feats = tf.constant(features[:images])
    refs = references[:images]
    sample, greedy, policy = compiled_calls(
        strategy, model, scst_optimizer, k, max_length, clip_norm=5.0, dropout=True
    )
    seed = tf.constant([0, 1], tf.int32)
    drawn = {key: v.numpy() for key, v in sample(feats, seed, 0, images).items()}
    greedy_out = {key: v.numpy() for key, v in greedy(feats).items()}
    rewards = score_samples(df, drawn, refs, k)
    t_sample = timed(
        lambda: {key: v.numpy() for key, v in sample(feats, seed, 0, images).items()}, args.steps
    )
    t_greedy = timed(lambda: {key: v.numpy() for key, v in greedy(feats).items()}, args.steps)
    t_reward = timed(lambda: score_samples(df, drawn, refs, k), args.steps)
    t_reward_greedy = timed(lambda: score_samples(df, drawn, refs, k, greedy_out), args.steps)
    inputs = (
        images,
        seed,
        features[:images],
        teacher_tokens(drawn["token_ids"]),
        rewards.advantages,
        rewards.rewards,
        rewards.baselines,
    )
    t_policy = timed(lambda: policy(*inputs), args.steps)
    mean_len = float(np.mean(drawn["lengths"]))
    scst_mean = t_sample + t_reward + t_policy
    scst_greedy = scst_mean + t_greedy + (t_reward_greedy - t_reward)
    ours, theirs = rewards_per_second(vocab_size)

    print(f"scst benchmark: {what}; {batch} CE pairs vs {images} images x {k} samples")
    print(f"sampled captions: {mean_len:.1f} words on average (limit {max_length})\n")
    print(f"{'step':<34}{'ms':>9}{'x CE':>8}")
    rows = [
        ("cross-entropy step", ce),
        ("  sample K per image", t_sample),
        ("  CIDEr-D rewards (mean baseline)", t_reward),
        ("  policy-gradient step", t_policy),
        ("self-critical step, mean baseline", scst_mean),
        ("  + greedy call and its rewards", scst_greedy - scst_mean),
        ("self-critical step, greedy baseline", scst_greedy),
    ]
    for name, seconds in rows:
        print(f"{name:<34}{seconds * 1000:>9.1f}{seconds / ce:>8.2f}")
    print(f"\nreward share of the self-critical step: {t_reward / scst_mean:.1%}")
    print(f"CIDEr-D rewards/s: {ours:,.0f} (pycocoevalcap's scorer: {theirs:,.0f}; ", end="")
    print(f"{ours / theirs:.1f}x)")


if __name__ == "__main__":
    main()
