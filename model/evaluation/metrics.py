"""Corpus-level COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

Scores are computed once over the whole split (CIDEr's IDF is corpus-level;
never average per-shard scores). pycocoevalcap's PTB tokenizer and METEOR need
Java; without it we say so once, tokenise in Python, omit METEOR and mark the
result as not comparable with published numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.text.vocab import standardize

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# What shows looping (model.text.ngrams.looping_figures), printed under the metrics, in %.
LOOPING_KEYS = ("repeated_3gram_share", "at_length_limit_share", "distinct_captions_per_image")
_SHORT = {
    "repeated_3gram_share": "loops %",
    "at_length_limit_share": "at limit %",
    "distinct_captions_per_image": "distinct %",
}
LOG = logging.getLogger(__name__)


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize(captions: Mapping[Any, Sequence[str]], use_java: bool) -> dict[Any, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        from model.quiet import PTB_TOKENIZER_NOTICE, filtered_stderr

        with filtered_stderr(PTB_TOKENIZER_NOTICE):
            return PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in v] for k, v in captions.items()}
            )
    return {k: [standardize(c) for c in v] for k, v in captions.items()}


def score_captions(
    references: Mapping[Any, Sequence[str]],
    predictions: Mapping[Any, str],
    use_java: bool | None = None,
) -> dict[str, Any]:
    """Scores one prediction per image against all of its references.

    Returns the metrics under pycocoevalcap's key names plus `comparable`
    (True when the PTB tokenizer and METEOR ran, as in the literature).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(
            f"{len(missing)} predicted images have no reference captions, e.g. {missing[0]}"
        )
    if use_java is None:
        use_java = java_available()
        if not use_java:
            LOG.warning("Java not found: Python tokenizer, no METEOR; scores are not comparable")
    gts = _tokenize({i: list(references[i]) for i in ids}, use_java)
    res = _tokenize({i: [predictions[i]] for i in ids}, use_java)
    scorers: list[tuple[Any, Any]] = [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Rouge(), "ROUGE_L"),
        (Cider(), "CIDEr"),
    ]
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.insert(1, (Meteor(), "METEOR"))
    out: dict[str, Any] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
            score, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score, strict=True)})
        else:
            out[names] = float(score)
    out["comparable"] = use_java
    out["tokenizer"] = (
        "ptb (Stanford CoreNLP)" if use_java else "python (model.text.vocab.standardize)"
    )
    out["images"] = len(ids)
    return out


def cider(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's) with the Python tokenizer: no Java, a fraction of
    a second for a few thousand images. What training selects its checkpoint by."""
    per_image = cider_per_image(references, predictions, use_java=False)
    return float(np.mean(list(per_image.values())))


def cider_per_image(
    references: Mapping[Any, Sequence[str]],
    predictions: Mapping[Any, str],
    use_java: bool = False,
) -> dict[Any, float]:
    """Each image's CIDEr-D, pycocoevalcap's (its document frequencies come from all the
    images' references, so a score belongs to this set of images); the corpus CIDEr is
    their mean. `use_java`: the PTB tokenizer, as `score_captions` uses when it can."""
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions)
    gts = _tokenize({i: list(references[i]) for i in ids}, use_java)
    res = _tokenize({i: [predictions[i]] for i in ids}, use_java)
    _, scores = Cider().compute_score(gts, res)
    return {i: float(s) for i, s in zip(gts, scores, strict=True)}  # in gts' order


def paired_ratio(
    base: Sequence[float], other: Sequence[float], rounds: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """mean(other) / mean(base) of two models' per-image scores on the same images, and
    its 95% paired bootstrap interval (images drawn with replacement, both models' scores
    of an image kept together): how far a ratio measured on a few hundred images can be
    trusted."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    draws = np.random.default_rng(seed).integers(0, len(a), (rounds, len(a)))
    ratios = b[draws].mean(axis=1) / a[draws].mean(axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(b.mean() / a.mean()), float(low), float(high)


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Metrics as a text table, one column per named result (e.g. model vs baseline):
    the COCO metrics x 100, then the looping figures in %."""
    names = list(rows)
    lines = [f"{'metric':<10}" + "".join(f"{n:>16}" for n in names)]
    for key in (*METRIC_KEYS, *LOOPING_KEYS):
        cells = [rows[n].get(key) for n in names]
        if all(c is None for c in cells):
            continue
        lines.append(
            f"{_SHORT.get(key, key):<10}"
            + "".join(f"{c * 100:>16.2f}" if c is not None else " " * 15 + "-" for c in cells)
        )
    return "\n".join(lines)
