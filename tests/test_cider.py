"""The vectorised CIDEr-D reward equals pycocoevalcap's CIDEr-D, image by image."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer

from model.text.cider import CiderD, ngram_keys


def corpus(seed: int, images: int = 300):
    """Captions with a Zipfian vocabulary, 1 to 20 words: repeats, shared and rare
    n-grams, candidates that copy a reference, share nothing, or have one word."""
    rng = np.random.RandomState(seed)
    words = np.arange(4, 60)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()

    def sentence() -> list[int]:
        return rng.choice(words, rng.randint(1, 21), p=p).tolist()

    refs = [[sentence() for _ in range(5)] for _ in range(images)]
    cands = []
    for i in range(images):
        kind = i % 4
        cands.append(refs[i][0] if kind == 0 else [int(words[-1])] if kind == 1 else sentence())
    return cands, refs


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_pycocoevalcap_cider_d(seed):
    cands, refs = corpus(seed)
    text = lambda ids: " ".join(f"w{t}" for t in ids)  # noqa: E731
    scorer = CiderScorer(n=4, sigma=6.0)
    for c, rs in zip(cands, refs, strict=True):
        scorer += (text(c), [text(r) for r in rs])
    want_mean, want = scorer.compute_score()
    got = CiderD.from_references(refs).scores(cands, refs)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert got.mean() == pytest.approx(want_mean, abs=1e-6)
    assert got.max() > 1.0 and (got == 0).any()  # copies score high, strangers zero


def test_document_frequencies_are_fixed_and_travel(tmp_path):
    cands, refs = corpus(2, images=40)
    cider = CiderD.from_references(refs)
    cider.save(str(tmp_path / "df.npz"))
    again = CiderD.load(str(tmp_path / "df.npz"))
    # Scoring a few images against the training corpus's frequencies, not their own:
    # the same 3 images scored with their own frequencies get other scores.
    corpus_scores = cider.scores(cands[:3], refs[:3])
    np.testing.assert_array_equal(again.scores(cands[:3], refs[:3]), corpus_scores)
    own = CiderD.from_references(refs[:3]).scores(cands[:3], refs[:3])
    assert np.abs(own - corpus_scores).max() > 1e-3


def test_ngram_keys_count_every_order():
    keys, counts = ngram_keys([5, 6, 5, 6])
    assert len(keys) == 2 + 2 + 2 + 1  # {5,6}, {56,65}, {565,656}, {5656}
    assert sorted(counts.tolist()) == [1, 1, 1, 1, 2, 2, 2]  # 5, 6 and 5-6 twice


def test_empty_candidates_score_zero_even_when_all_are_empty():
    """An untrained or early model may end a caption at once: every sample empty."""
    df = CiderD.from_references([[[5, 6, 7]], [[8, 9]]])
    np.testing.assert_array_equal(df.scores([[], []], [[[5, 6, 7]], [[8, 9]]]), [0.0, 0.0])
    assert df.scores([[], [8, 9]], [[[5, 6, 7]], [[8, 9]]])[1] > 0


def test_per_image_cider_averages_to_the_corpus_score_and_the_paired_ratio_brackets_it():
    from pycocoevalcap.cider.cider import Cider

    from model.evaluation.metrics import cider, cider_per_image, paired_ratio

    cands, refs = corpus(2, images=200)
    text = {i: " ".join(f"w{t}" for t in c) for i, c in enumerate(cands)}
    references = {i: [" ".join(f"w{t}" for t in r) for r in rs] for i, rs in enumerate(refs)}
    per_image = cider_per_image(references, text)
    corpus_score, scores = Cider().compute_score(
        {i: references[i] for i in sorted(text)}, {i: [text[i]] for i in sorted(text)}
    )
    assert list(per_image) == sorted(text)
    np.testing.assert_allclose(list(per_image.values()), scores, rtol=1e-12)
    assert cider(references, text) == pytest.approx(corpus_score, rel=1e-12)
    a = np.array(list(per_image.values()))
    assert paired_ratio(a, 1.2 * a) == pytest.approx((1.2, 1.2, 1.2))
    b = a + np.random.RandomState(0).normal(0.1, 0.5, len(a))
    ratio, low, high = paired_ratio(a, b)
    assert low < ratio < high and ratio == pytest.approx(b.mean() / a.mean())
    assert paired_ratio(a, b, seed=1)[1:] != (low, high)  # drawn, not fixed
