"""What the extract job leaves in FEATURES_DIR besides its shards: vocabulary and manifest.

- At start, `check_existing_manifest` refuses a FEATURES_DIR whose features were
  computed another way (`formats.features_mismatch`), and `prepare_vocab` finds the
  vocabulary a split other than train must reuse.
- At the end, once every shard is final, `commit_features_manifest` merges this run's
  splits into manifest.json and only then deletes the shards of an earlier extraction
  of those splits that the manifest no longer lists: a reader that follows the
  manifest never sees a partial set.
"""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems

from model.cli import UsageError
from model.images.extractor import (
    features_identity,
)
from model.io import formats
from model.text.vocab import PUNCTUATION, RESERVED, Vocabulary, top_k_words


def features_manifest_body(args: argparse.Namespace) -> dict[str, Any]:
    """What the features are: every field a reader must match to reuse them."""
    return features_identity(args.weights, args.precision)


def check_existing_manifest(output_dir: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Fails at start if FEATURES_DIR holds features computed another way."""
    path = formats.features_manifest_path(output_dir)
    if not FileSystems.exists(path):
        return None
    existing = formats.read_manifest(path, formats.KIND_FEATURES)
    if diff := formats.features_mismatch(existing, body):
        key, found, wanted = diff
        raise UsageError(
            f"{output_dir} holds features with {key}={found!r}; this run uses "
            f"{wanted!r} (use another --output_dir)"
        )
    return existing


def write_vocab(counts: dict[str, int], path: str, size: int) -> int:
    vocab = Vocabulary(tuple(top_k_words(counts, size)))
    vocab.save(path)
    return len(vocab)


def commit_features_manifest(
    output_dir: str,
    body: dict[str, Any],
    split_stats: dict[str, tuple[int, int]],
    error_stats: dict[str, int],
    shards: list[str],
    vocab: dict[str, Any],
    splits: Sequence[str],
    orphans: dict[str, int],
    images_dir: str = "",
    dropped: dict[str, int] | None = None,
) -> str:
    """Merges this run's splits into FEATURES_DIR/manifest.json, after every shard is final."""
    path = formats.features_manifest_path(output_dir)
    existing = (
        formats.read_manifest(path, formats.KIND_FEATURES) if FileSystems.exists(path) else {}
    )
    all_splits = dict(existing.get("splits", {}))
    for split in splits:
        images, captions = split_stats.get(split, (0, 0))
        all_splits[split] = {
            "images": images,
            "captions": captions,
            "errors": error_stats.get(split, 0),
            "orphan_annotations": orphans.get(split, 0),
            "dropped_captions": (dropped or {}).get(split, 0),
            "images_dir": images_dir,
            "shards": sorted(
                posixpath.basename(s)
                for s in shards
                if posixpath.basename(s).startswith(f"{split}-")
            ),
        }
    formats.write_manifest(
        path,
        formats.KIND_FEATURES,
        {**body, "splits": all_splits, "vocab": vocab, "created_by": "beam_jobs.extract_features"},
    )
    remove_unlisted_shards(output_dir, {s: all_splits[s]["shards"] for s in splits})
    return path


def remove_unlisted_shards(output_dir: str, listed: dict[str, list[str]]) -> list[str]:
    """After the manifest names a split's new shards, an earlier extraction's shards of
    that split (another shard count) are deleted: readers only ever see complete sets."""
    stale = [
        m.path
        for split, names in listed.items()
        for m in FileSystems.match([formats.shard_pattern(output_dir, split)])[0].metadata_list
        if posixpath.basename(m.path) not in names
    ]
    if stale:
        FileSystems.delete(stale)
    return stale


def prepare_vocab(args: argparse.Namespace, splits: Sequence[str]) -> dict[str, Any]:
    """Describes the vocabulary; non-train runs must find one at start."""
    target = f"{args.output_dir.rstrip('/')}/{formats.VOCAB_FILE}"
    info = {
        "file": formats.VOCAB_FILE,
        "built_from": "train",
        "requested_size": args.vocab_size,
        "reserved": list(RESERVED),
        "standardization": f"lowercase; replace {PUNCTUATION!r} with spaces; split on whitespace",
        "order": "frequency descending, ties alphabetical",
    }
    if "train" in splits:
        return info
    source = args.vocab or target
    if not FileSystems.exists(source):
        raise UsageError(
            f"no vocabulary for split {','.join(splits)}: {source} does not exist "
            "(run the train split first or pass --vocab PATH)"
        )
    vocab = Vocabulary.load(source)
    if source != target:
        vocab.save(target)
    return {**info, "size": len(vocab)}
