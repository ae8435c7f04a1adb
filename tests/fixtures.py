"""Builders for tiny artifacts: features dirs written directly, and tiny exports."""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from model.images.extractor import features_identity
from model.io import formats
from model.network.captioner import ShowAttendTell
from model.network.export import save_export
from model.text.vocab import END_ID, Vocabulary

WORDS = ["red", "blue", "green", "circle", "square", "left", "right"]


def caption_for(i: int) -> str:
    return f"a {WORDS[i % 3]} {WORDS[3 + i % 2]} on the {WORDS[5 + (i // 2) % 2]}"


def write_features_dir(
    path: str,
    splits: dict[str, int],
    shards: int = 2,
    seed: int = 0,
    captions: Callable[[int], list[str]] | None = None,
    constant_channels: slice | None = None,
) -> Vocabulary:
    """Features whose content predicts the caption, so a model can learn it.

    `captions(i)` overrides image i's captions; `constant_channels` are 0 in every
    image (as hundreds of random-init `mixed10` channels are).
    """
    rng = np.random.RandomState(seed)
    os.makedirs(path, exist_ok=True)
    all_caps = [caption_for(i) for i in range(12)]
    vocab = Vocabulary.build(all_caps, size=30)
    vocab.save(os.path.join(path, formats.VOCAB_FILE))
    split_entries = {}
    for split, count in splits.items():
        names = []
        writers = []
        for s in range(shards):
            name = f"{split}-{s:05d}-of-{shards:05d}{formats.SHARD_SUFFIX}"
            names.append(name)
            writers.append(tf.io.TFRecordWriter(os.path.join(path, name), options="GZIP"))
        n_caps = 0
        for i in range(count):
            feats = rng.rand(*formats.FEATURE_SHAPE).astype(np.float32) * 0.1
            feats[:, i % 12] += 1.0  # the caption's class is written into the features
            if constant_channels is not None:
                feats[:, constant_channels] = 0.0
            caps = captions(i) if captions else [caption_for(i % 12)] * (1 + i % 2)
            n_caps += len(caps)
            writers[i % shards].write(formats.make_example(i, f"img{i}.jpg", feats, caps, 32, 32))
        for w in writers:
            w.close()
        split_entries[split] = {"images": count, "captions": n_caps, "errors": 0, "shards": names}
    formats.write_manifest(
        os.path.join(path, formats.MANIFEST_FILE),
        formats.KIND_FEATURES,
        {**features_identity("none"), "splits": split_entries, "vocab": {"size": len(vocab)}},
    )
    return vocab


def write_tiny_export(
    path: str,
    vocab_size: int = 12,
    max_length: int = 6,
    mute: bool = False,
    features: dict | None = None,
) -> str:
    """A random tiny captioner exported as stage 2 would (weights=none features, unless
    `features` says how they were made); `mute`: one that always says `<end>` first (an
    empty caption), as a broken one may."""
    vocab = Vocabulary(
        ("<pad>", "<unk>", "<start>", "<end>", *[f"w{i}" for i in range(vocab_size - 4)])
    )
    keras.utils.set_random_seed(7)
    model = ShowAttendTell(vocab_size=vocab_size, embedding_dim=8, units=8)
    if mute:
        bias = model.decoder.fc2.bias
        bias.assign(bias + 100.0 * np.eye(vocab_size, dtype=np.float32)[END_ID])
    features = features or features_identity("none")
    save_export(model, vocab, features, path, max_length=max_length)
    return path
