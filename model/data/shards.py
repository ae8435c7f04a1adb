"""tf.data over the feature shards: image-caption pairs, padded to the longest caption per batch.

Shards are interleaved in parallel, records are parsed after batching
(vectorised `parse_example`), captions are tokenised in-graph with the saved
vocabulary, and every image yields one pair per caption. Memory is bounded by
the shuffle buffers, whatever the corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from model.io import formats
from model.text.vocab import END_ID, START_ID, UNK_ID, Vocabulary, tf_standardize


def make_lookup(vocab: Vocabulary) -> tf.lookup.StaticHashTable:
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(vocab.tokens), tf.range(len(vocab), dtype=tf.int32)
    )
    return tf.lookup.StaticHashTable(init, default_value=UNK_ID)


@dataclass(frozen=True)
class SplitInfo:
    """What the manifest says about one split of FEATURES_DIR."""

    files: list[str]
    images: int
    captions: int


def check_data_dir(data_dir: str) -> tuple[dict[str, Any], Vocabulary]:
    """Reads and checks FEATURES_DIR's manifest and vocabulary; one-line errors."""
    if not tf.io.gfile.exists(data_dir):
        raise formats.FormatError(f"--data_dir does not exist: {data_dir}")
    manifest = formats.read_manifest(
        formats.features_manifest_path(data_dir), formats.KIND_FEATURES
    )
    formats.check_backbone(manifest, data_dir)
    path = formats.features_vocab_path(data_dir, manifest)
    if not tf.io.gfile.exists(path):
        raise formats.FormatError(f"{path}: named by the manifest but missing")
    vocab = Vocabulary.load(path)
    if manifest.get("vocab", {}).get("size") not in (None, len(vocab)):
        raise formats.FormatError(
            f"{path}: has {len(vocab)} tokens, manifest says {manifest['vocab']['size']}"
        )
    return manifest, vocab


def split_info(data_dir: str, manifest: dict[str, Any], split: str) -> SplitInfo:
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise formats.FormatError(
            f"{data_dir}: no split {split!r} (has {sorted(manifest.get('splits', {}))})"
        )
    if "shards" in entry:  # the shards the extraction that wrote this split completed
        files = [f"{data_dir.rstrip('/')}/{name}" for name in entry["shards"]]
        missing = [f for f in files if not tf.io.gfile.exists(f)]
        if missing:
            raise formats.FormatError(
                f"{missing[0]}: listed in the manifest for split {split!r} but missing "
                f"({len(missing)} of {len(files)} shards; re-extract the split)"
            )
    else:  # manifests written before 2026-11 list no shards
        files = sorted(tf.io.gfile.glob(formats.shard_pattern(data_dir, split)))
    if not files:
        raise formats.FormatError(f"{data_dir}: no shards for split {split!r}")
    return SplitInfo(files, int(entry["images"]), int(entry["captions"]))


def parse_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A batch of serialized records -> features (B, 64, 2048) float16 + ragged captions."""
    parsed = tf.io.parse_example(serialized, formats.feature_spec())
    features = tf.io.decode_raw(parsed[formats.KEY_FEATURES], tf.float16)
    return {
        "image_id": parsed[formats.KEY_ID],
        "file_name": parsed[formats.KEY_FILE],
        "features": tf.reshape(features, [-1, *formats.FEATURE_SHAPE]),
        "captions": tf.RaggedTensor.from_sparse(parsed[formats.KEY_CAPTIONS]),
    }


def records(files: list[str], shuffle_files: bool, seed: int | None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(8, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def caption_pairs(
    files: list[str],
    vocab: Vocabulary,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    max_tokens: int = 40,
    record_buffer: int = 512,
    pair_buffer: int = 2048,
    drop_remainder: bool = False,
    length_multiple: int = 1,
) -> tf.data.Dataset:
    """(features float16 (B, 64, 2048), tokens int32 (B, T)) with T = longest caption in batch.

    Tokens are `<start> w1 .. wn <end>`, truncated to `max_tokens`, padded with 0.
    With `shuffle`, the order is a deterministic function of `seed`, so a
    resumed epoch can skip the batches it already trained on. `length_multiple`
    rounds T up (more `<pad>`, which the loss masks), so XLA compiles one
    program per bucket of lengths instead of one per length.
    """
    table = make_lookup(vocab)

    def to_pairs(batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        captions = batch["captions"]  # (B, None) strings
        words = tf.strings.split(tf_standardize(captions.flat_values))  # (N, None)
        ids = tf.ragged.map_flat_values(table.lookup, words)
        n = ids.nrows()
        start = tf.fill([n, 1], START_ID)
        end = tf.fill([n, 1], END_ID)
        tokens = tf.concat([start, ids[:, : max_tokens - 2], end], axis=1)
        features = tf.repeat(batch["features"], captions.row_lengths(), axis=0)
        return features, tokens.to_tensor(), tf.cast(tokens.row_lengths(), tf.int32)

    def trim(
        features: tf.Tensor, tokens: tf.Tensor, length: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        return features, tokens[:length]  # drop the record batch's padding again

    ds = records(files, shuffle, seed)
    if shuffle:
        ds = ds.shuffle(record_buffer, seed=seed)
    ds = ds.batch(64).map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(to_pairs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(trim)
    if shuffle:
        ds = ds.shuffle(pair_buffer, seed=seed + 1)
    ds = ds.padded_batch(
        batch_size,
        padded_shapes=([*formats.FEATURE_SHAPE], [None]),
        drop_remainder=drop_remainder,
    )
    if length_multiple > 1:

        def round_up(features: tf.Tensor, tokens: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            extra = -tf.shape(tokens)[1] % length_multiple
            return features, tf.pad(tokens, [[0, 0], [0, extra]])

        ds = ds.map(round_up)
    return ds.prefetch(tf.data.AUTOTUNE)


def image_records(
    files: list[str], batch_size: int, first: int = 0, count: int = -1
) -> tf.data.Dataset:
    """Whole images in file order (evaluation): dicts of parse_batch, features as float32;
    `count` images from the `first` on (-1: all the rest)."""

    def to_float(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**batch, "features": tf.cast(batch["features"], tf.float32)}

    ds = records(files, shuffle_files=False, seed=None).skip(first).take(count)
    ds = ds.batch(batch_size)
    return ds.map(parse_batch).map(to_float).prefetch(tf.data.AUTOTUNE)


def image_batches(
    files: list[str], batch_size: int, seed: int, record_buffer: int = 512
) -> tf.data.Dataset:
    """Whole images in an order fixed by `seed` (self-critical training): dicts of
    parse_batch, features as float32. A resumed epoch skips the batches it did."""

    def to_float(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**batch, "features": tf.cast(batch["features"], tf.float32)}

    ds = records(files, shuffle_files=True, seed=seed).shuffle(record_buffer, seed=seed)
    ds = ds.batch(batch_size).map(parse_batch).map(to_float)
    return ds.prefetch(tf.data.AUTOTUNE)


def feature_stats(files: list[str], max_images: int = 2000) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel mean and variance over the locations of the first `max_images` images."""
    total = total_sq = None
    count = 0
    for batch in image_records(files, 256).take(max(1, max_images // 256)):
        x = tf.reshape(tf.cast(batch["features"], tf.float64), [-1, formats.FEATURE_SHAPE[1]])
        s, sq = tf.reduce_sum(x, 0), tf.reduce_sum(tf.square(x), 0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += int(x.shape[0])
    mean = total / count
    variance = tf.maximum(total_sq / count - tf.square(mean), 0.0)
    return tf.cast(mean, tf.float32), tf.cast(variance, tf.float32)
