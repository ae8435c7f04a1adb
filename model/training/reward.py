"""Self-critical sequence training (Rennie et al. 2017): CIDEr-D as the reward.

After the cross-entropy epochs, each step draws K captions per image from the model
(multinomial sampling, one compiled call: `model.decoding.decoders.sample_graph`),
scores each with CIDEr-D against the image's references (`model.text.cider`, document
frequencies of the training references, fixed once per features dir) and raises the
log-probability of the captions that beat a baseline:

    grad L = - sum_i (r(w_i) - b_i) grad log p(w_i | I) / (tokens of all w_i)

with b_i the mean reward of the image's other K - 1 samples (ruotianluo's "new
self-critical", the default) or the reward of the image's greedy caption (Rennie's
original, `--scst_baseline greedy`). The log-probabilities come from a teacher-forced
pass over the samples (with the model's dropout unless `--scst_dropout off`, and the
sampler's masks: banned and repeat-blocked tokens), so the step is the same distributed,
clipped update as cross-entropy's (`model.training.steps`).

Each worker samples, scores and back-propagates only its replicas' share of the step's
images (`model.training.steps.PolicyStep`); each row's draws are seeded by the run's
seed, the step and the row's place in the global batch, so however the batch is split,
N replicas or hosts draw the same captions and apply the update one device would.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.text.cider import CiderD
from model.text.vocab import END_ID, PAD_ID, START_ID, Vocabulary

BASELINES = ("mean", "greedy")


def mean_of_others(rewards: np.ndarray, samples: int) -> np.ndarray:
    """(B * K,) rewards, image b's at b*K .. b*K+K-1 -> each one's baseline: the mean of
    the image's other K - 1 rewards (K = 1: zero, i.e. plain REINFORCE)."""
    if samples == 1:
        return np.zeros_like(rewards)
    per_image = rewards.reshape(-1, samples)
    others = (per_image.sum(axis=1, keepdims=True) - per_image) / (samples - 1)
    return others.reshape(-1)


def caption_ids(token_ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Decoded rows (words, then `<end>` and `<pad>`) -> each row's words and, if it
    ended, its `<end>`: the reward scores the ending too (see `reference_ids`)."""
    out = []
    for row, n in zip(token_ids, lengths, strict=True):
        ended = n < len(row) and row[n] == END_ID
        out.append(row[: n + 1 if ended else n].tolist())
    return out


def teacher_tokens(token_ids: np.ndarray) -> np.ndarray:
    """Sampled rows (B, T): words, `<end>`, `<pad>` -> (B, T + 1) `<start>` first, the
    input of a teacher-forced pass whose targets are the sampled tokens themselves."""
    start = np.full((token_ids.shape[0], 1), START_ID, token_ids.dtype)
    return np.concatenate([start, token_ids], axis=1)


def reference_ids(captions: Sequence[Sequence[bytes]], vocab: Vocabulary) -> list[list[list[int]]]:
    """Each image's reference captions as token ids, each ending with `<end>`.

    The end token is part of every sentence the reward sees, references, samples and
    document frequencies alike, as in ruotianluo's self-critical code: a sample that
    stops mid-phrase ("a girl is playing in a red and white") then misses the reference
    n-grams that end a caption ("white <end>"), and self-critical training does not learn
    to cut captions short for the n-grams they keep (the "bad endings" of CIDEr-D)."""
    return [
        [[*vocab.encode(c.decode(), add_markers=False), END_ID] for c in refs] for refs in captions
    ]


def df_path(data_dir: str, vocab: Vocabulary, split: str) -> str:
    """Where the document frequencies of `split`'s references live: FEATURES_DIR/
    cider-df-SPLIT-VOCABHASH-end.npz (the n-gram keys are token ids of that vocabulary,
    each reference ending with `<end>`)."""
    digest = hashlib.sha256("\n".join(vocab.tokens).encode()).hexdigest()[:12]
    return f"{data_dir.rstrip('/')}/cider-df-{split}-{digest}-end.npz"


def load_or_build_df(
    data_dir: str, vocab: Vocabulary, split: str, files: list[str], chief: bool
) -> CiderD:
    """The reward's document frequencies: read from the features dir, or computed from
    the split's references (a few seconds) and, on the chief, stored there for the next
    run. A features dir that cannot be written to only costs the recomputation."""
    from model.data.shards import image_records
    from model.io import storage

    path = df_path(data_dir, vocab, split)
    if storage.exists(path):
        return CiderD.load(io.BytesIO(storage.read_bytes(path)))
    references: list[list[list[int]]] = []
    for batch in image_records(files, 512):
        references += reference_ids(batch["captions"].to_list(), vocab)
    df = CiderD.from_references(references)
    if chief:
        buffer = io.BytesIO()
        df.save(buffer)
        try:
            storage.write_bytes(path, buffer.getvalue())
        except Exception as e:  # noqa: BLE001 - a read-only features dir is fine
            print(
                f"train: could not store {path} ({type(e).__name__}); kept in memory",
                file=sys.stderr,
            )
    return df


@dataclass(frozen=True)
class Rewards:
    """One step's rewards: per sample, its baseline, and the advantage it trains with."""

    rewards: np.ndarray  # (B * K,)
    baselines: np.ndarray  # (B * K,)

    @property
    def advantages(self) -> np.ndarray:
        return (self.rewards - self.baselines).astype(np.float32)


def score_samples(
    df: CiderD,
    samples: dict[str, np.ndarray],
    references: list[list[list[int]]],
    k: int,
    greedy: dict[str, np.ndarray] | None = None,
) -> Rewards:
    """CIDEr-D of each sample against its image's references, and the baseline: the
    mean of the image's other samples, or (with `greedy`) its greedy caption's reward."""
    per_sample_refs = [refs for refs in references for _ in range(k)]
    rewards = df.scores(caption_ids(samples["token_ids"], samples["lengths"]), per_sample_refs)
    if greedy is None:
        return Rewards(rewards, mean_of_others(rewards, k))
    greedy_rewards = df.scores(caption_ids(greedy["token_ids"], greedy["lengths"]), references)
    return Rewards(rewards, np.repeat(greedy_rewards, k))


def sampled_tokens(samples: dict[str, np.ndarray]) -> int:
    """Tokens the policy loss counts: each sample's words and its `<end>`."""
    return int(np.sum(teacher_tokens(samples["token_ids"])[:, 1:] != PAD_ID))
