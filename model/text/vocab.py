"""Caption vocabulary: standardisation, top-k building, vocab.txt I/O, encode/decode.

Pure Python so Beam workers, the trainer and tests share one definition. Its
TensorFlow twin, `tf_standardize` (string ops, for the tf.data pipeline), sits right
below `standardize`; tests/test_vocab.py checks that the two agree byte for byte.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.io import storage

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
RESERVED: tuple[str, ...] = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(len(RESERVED))

# ASCII punctuation only: the same set is expressible in Python `re` and in
# RE2 (tf.strings.regex_replace), so both tokenisers agree byte for byte.
PUNCTUATION = string.punctuation
# Every character Python's `str.split()` splits on (no-break, thin and ideographic
# spaces, line separators, ...; none lies above U+3000). tf.strings.split knows
# only ASCII whitespace, so both tokenisers first turn these into plain spaces.
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_STRIP = str.maketrans({c: " " for c in PUNCTUATION + WHITESPACE})


def standardize(text: str) -> str:
    """Lowercases, replaces ASCII punctuation and any whitespace with spaces, collapses them."""
    return " ".join(w for w in text.lower().translate(_STRIP).split(" ") if w)


# RE2 spells every whitespace character as \x{HHHH}: a literal tab or no-break
# space inside a character class is easy to lose in transit.
_PUNCT_RE = "[" + re.escape(PUNCTUATION) + "".join(f"\\x{{{ord(c):04x}}}" for c in WHITESPACE) + "]"


def tf_standardize(text: Any) -> Any:
    """`standardize` with TensorFlow string ops, for tf.data: tf.string -> tf.string.
    Spaces are not collapsed; `tf.strings.split` (no separator) skips the empty words."""
    import tensorflow as tf

    text = tf.strings.lower(text, encoding="utf-8")
    return tf.strings.regex_replace(text, _PUNCT_RE, " ")


def tokenize(text: str) -> list[str]:
    """Splits a caption into standardised words."""
    return standardize(text).split()


def count_words(captions: Iterable[str]) -> collections.Counter[str]:
    """Word frequencies over captions (the reduction the Beam job runs as a combiner)."""
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update(tokenize(caption))
    return counts


def top_k_words(counts: Mapping[str, int], size: int) -> list[str]:
    """Returns the vocabulary: reserved tokens, then the most frequent words.

    Ties are broken alphabetically so the order is deterministic whatever
    order the counts were merged in. `size` includes the reserved tokens.
    """
    if size <= len(RESERVED):
        raise ValueError(f"vocab size must exceed {len(RESERVED)} reserved tokens, got {size}")
    words = sorted((w for w in counts if w not in RESERVED), key=lambda w: (-counts[w], w))
    return list(RESERVED) + words[: size - len(RESERVED)]


@dataclass(frozen=True)
class Vocabulary:
    """A token list where line number = id; reserved tokens at fixed ids."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(RESERVED)]) != RESERVED:
            raise ValueError(f"vocabulary must start with {RESERVED}, got {self.tokens[:4]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def build(cls, captions: Iterable[str], size: int) -> Vocabulary:
        return cls(tuple(top_k_words(count_words(captions), size)))

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Token -> id, built once: encoding a corpus's references looks up every word."""
        return {t: i for i, t in enumerate(self.tokens)}

    def encode(self, caption: str, add_markers: bool = True) -> list[int]:
        """Caption text to ids, unknown words to `<unk>`, wrapped in start/end."""
        index = self.index
        ids = [index.get(w, UNK_ID) for w in tokenize(caption)]
        return [START_ID, *ids, END_ID] if add_markers else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text, stopping at `<end>` and skipping `<start>`/`<pad>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)

    def save(self, path: str) -> None:
        storage.write_text(path, "\n".join(self.tokens) + "\n")

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        try:
            with storage.open_file(path, "r") as f:
                tokens = tuple(line.rstrip("\n") for line in f if line.rstrip("\n"))
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {path}") from None
        return cls(tokens)
