"""CIDEr-D as a reward: pycocoevalcap's scores, vectorised with NumPy, document
frequencies fixed once.

Self-critical training (Rennie et al. 2017) rewards every sampled caption with its
CIDEr-D against the image's references, thousands of captions a step; pycocoevalcap's
scorer walks Python dictionaries per n-gram and recomputes the document frequencies
from whatever it is given. Here the document frequencies come from the training
references once (`CiderD.from_references`, saved with `save`), and a batch is scored
with array operations only: every sentence's n-grams become 62-bit keys (four token
ids of 15 bits and the order n), a sentence is a sparse tf-idf vector, and the
clipped overlap of each (candidate, reference) pair is a sort-merge of their keys.

The definition (Vedantam et al. 2015; pycocoevalcap.cider.cider_scorer) per candidate
c and its references S: for n = 1..4, g(x) = tf(x) * (log |images| - log max(1, df(x)))
over the n-grams x of a sentence;
    CIDEr-D_n = 10/|S| sum_s [sum_x min(g_c(x), g_s(x)) g_s(x)] / (|g_c| |g_s|)
                * exp(-(l_c - l_s)^2 / (2 sigma^2)),  sigma = 6,
with l the sentence's bigram count; CIDEr-D is the mean over n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np

MAX_N = 4
SIGMA = 6.0
ID_BITS = 15  # token ids < 32768; four of them and the order fit in 62 bits


def ngram_keys(tokens: Sequence[int], max_n: int = MAX_N) -> tuple[np.ndarray, np.ndarray]:
    """Unique n-gram keys (uint64) of one sentence and their counts, n = 1..max_n."""
    _, keys, counts = sentence_ngrams([tokens], max_n)
    return keys, counts


def sentence_ngrams(
    sentences: Sequence[Sequence[int]], max_n: int = MAX_N
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n-grams of many sentences at once: (owner, key, count) arrays, one entry per
    distinct n-gram of each sentence, sorted by owner then key."""
    lengths = np.array([len(x) for x in sentences], np.int64)
    width = max(int(lengths.max(initial=0)), max_n)
    tokens = np.zeros((len(sentences), width), np.uint64)
    for row, sentence in enumerate(sentences):
        tokens[row, : len(sentence)] = sentence
    if tokens.size and int(tokens.max()) >= 1 << ID_BITS:
        raise ValueError(f"token ids must be < {1 << ID_BITS}")
    owners, keys = [], []
    for n in range(1, max_n + 1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=1)  # (S, W-n+1, n)
        shifts = np.arange(n, dtype=np.uint64) * np.uint64(ID_BITS)
        key = (windows << shifts).sum(axis=2, dtype=np.uint64)
        key |= np.uint64(n - 1) << np.uint64(4 * ID_BITS)
        valid = np.arange(key.shape[1])[None, :] + n <= lengths[:, None]
        owners.append(np.nonzero(valid)[0])
        keys.append(key[valid])
    owner, key = np.concatenate(owners), np.concatenate(keys)
    if not len(owner):  # only empty sentences (a caption may be just `<end>`)
        return owner, key, np.zeros(0, np.int64)
    sort = np.lexsort((key, owner))
    owner, key = owner[sort], key[sort]
    first = np.flatnonzero(np.r_[True, (owner[1:] != owner[:-1]) | (key[1:] != key[:-1])])
    count = np.diff(np.r_[first, len(owner)])
    return owner[first], key[first], count


def key_order(keys: np.ndarray) -> np.ndarray:
    """n - 1 of each key."""
    return (keys >> np.uint64(4 * ID_BITS)).astype(np.int64)


@dataclass(frozen=True)
class CiderD:
    """Document frequencies of a reference corpus: `keys` (sorted uint64 n-gram keys),
    `df` (in how many images' reference sets each occurs) and the number of images."""

    keys: np.ndarray
    df: np.ndarray
    images: int

    @classmethod
    def from_references(cls, references: Sequence[Sequence[Sequence[int]]]) -> CiderD:
        """`references[i]`: the token-id lists of image i's reference captions."""
        flat = [r for refs in references for r in refs]
        image = np.repeat(np.arange(len(references)), [len(r) for r in references])
        owner, key, _ = sentence_ngrams(flat)
        owner = image[owner]  # distinct per image: an n-gram counts once per reference set
        sort = np.lexsort((key, owner))
        owner, key = owner[sort], key[sort]
        first = np.r_[True, (owner[1:] != owner[:-1]) | (key[1:] != key[:-1])]
        keys, df = np.unique(key[first], return_counts=True)
        return cls(keys, df, len(references))

    def save(self, path: str | IO[bytes]) -> None:
        np.savez_compressed(path, keys=self.keys, df=self.df, images=self.images)

    @classmethod
    def load(cls, path: str | IO[bytes]) -> CiderD:
        with np.load(path) as f:
            return cls(f["keys"], f["df"], int(f["images"]))

    def _vectors(self, sentences: Sequence[Sequence[int]]) -> tuple[np.ndarray, ...]:
        """All sentences' tf-idf entries as flat arrays (sentence, key, order, value),
        with each sentence's norm per order (S, MAX_N) and bigram count (S,)."""
        owner, keys, counts = sentence_ngrams(sentences)
        at = np.searchsorted(self.keys, keys)
        found = (at < len(self.keys)) & (self.keys[np.minimum(at, len(self.keys) - 1)] == keys)
        df = np.where(found, self.df[np.minimum(at, len(self.keys) - 1)], 0)
        value = counts * (np.log(float(self.images)) - np.log(np.maximum(1.0, df)))
        order = key_order(keys)
        norms = np.zeros((len(sentences), MAX_N))
        np.add.at(norms, (owner, order), value**2)
        bigrams = np.bincount(owner[order == 1], counts[order == 1], minlength=len(sentences))
        return owner, keys, order, value, np.sqrt(norms), bigrams

    def scores(
        self, candidates: Sequence[Sequence[int]], references: Sequence[Sequence[Sequence[int]]]
    ) -> np.ndarray:
        """CIDEr-D of each candidate against its own references: (len(candidates),)."""
        refs_flat = [r for refs in references for r in refs]
        ref_of = np.repeat(np.arange(len(references)), [len(r) for r in references])
        c_owner, c_keys, c_order, c_val, c_norm, c_len = self._vectors(candidates)
        r_owner, r_keys, _, r_val, r_norm, r_len = self._vectors(refs_flat)
        # Pairs (candidate i, reference j of image i); every candidate entry once per pair.
        pair_cand, pair_ref = ref_of, np.arange(len(refs_flat))
        pairs_of_cand = np.bincount(pair_cand, minlength=len(candidates))
        first_pair = np.concatenate([[0], np.cumsum(pairs_of_cand)[:-1]])
        reps = pairs_of_cand[c_owner]
        entry = np.repeat(np.arange(len(c_keys)), reps)
        offset = np.arange(len(entry)) - np.repeat(np.cumsum(reps) - reps, reps)
        c_pair = first_pair[c_owner[entry]] + offset
        # Join on (pair, key): after sorting, a shared n-gram is two neighbours.
        pair = np.concatenate([c_pair, r_owner])  # a reference's pair is its own index
        key = np.concatenate([c_keys[entry], r_keys])
        is_cand = np.concatenate([np.ones(len(entry), bool), np.zeros(len(r_keys), bool)])
        value = np.concatenate([c_val[entry], r_val])
        order = np.concatenate([c_order[entry], key_order(r_keys)])
        sort = np.lexsort((~is_cand, key, pair))
        pair, key, is_cand, value, order = (x[sort] for x in (pair, key, is_cand, value, order))
        shared = (pair[:-1] == pair[1:]) & (key[:-1] == key[1:]) & is_cand[:-1]
        i = np.flatnonzero(shared)
        overlap = np.zeros((len(refs_flat), MAX_N))
        np.add.at(overlap, (pair[i], order[i]), np.minimum(value[i], value[i + 1]) * value[i + 1])
        denominator = c_norm[pair_cand] * r_norm[pair_ref]
        with np.errstate(divide="ignore", invalid="ignore"):
            overlap = np.where(denominator > 0, overlap / denominator, overlap)
        delta = (c_len[pair_cand] - r_len[pair_ref]).astype(np.float64)
        overlap *= np.exp(-(delta**2) / (2 * SIGMA**2))[:, None]
        per_cand = np.zeros((len(candidates), MAX_N))
        np.add.at(per_cand, pair_cand, overlap)
        per_cand /= np.maximum(pairs_of_cand, 1)[:, None]
        return (per_cand * 10.0).mean(axis=1)
