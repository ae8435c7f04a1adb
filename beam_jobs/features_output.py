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
import os
import posixpath
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.paths import is_local
from model.cli import UsageError
from model.images.extractor import (
    features_identity,
)
from model.io import formats
from model.text.vocab import PUNCTUATION, RESERVED, Vocabulary, top_k_words


def features_manifest_body(args: argparse.Namespace) -> dict[str, Any]:
    """What the features are: every field a reader must match to reuse them."""
    return features_identity(
        args.weights, args.precision, runtime=args.runtime, calibration=args.calibration
    )


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
    written: list[str],
    vocab: dict[str, Any],
    splits: Sequence[str],
    orphans: dict[str, int],
    images_dir: str = "",
    dropped: dict[str, int] | None = None,
) -> str:
    """Merges this run's splits into FEATURES_DIR/manifest.json, after every file is
    final, then deletes what it no longer names."""
    path = formats.features_manifest_path(output_dir)
    existing = (
        formats.read_manifest(path, formats.KIND_FEATURES) if FileSystems.exists(path) else {}
    )
    names = sorted(posixpath.basename(f) for f in written)
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
            "shards": [n for n in names if n.startswith(f"{split}-")],
            "errors_files": [n for n in names if n.startswith(f"errors-{split}-")],
        }
    replace_manifest(
        path,
        {**body, "splits": all_splits, "vocab": vocab, "created_by": "beam_jobs.extract_features"},
    )
    remove_unlisted(output_dir, all_splits, splits, vocab["file"])
    remove_beam_temp(output_dir)
    return path


def replace_manifest(path: str, body: dict[str, Any]) -> None:
    """Replaces the manifest in one step: a reader finds the old one or the new one, whole.
    On a local disk it is written aside and renamed over the old one; an object store
    replaces an object in one step by itself (a rename there would be a copy)."""
    if not is_local(path):
        formats.write_manifest(path, formats.KIND_FEATURES, body)
        return
    aside = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    formats.write_manifest(aside, formats.KIND_FEATURES, body)
    os.replace(aside, path)


def remove_unlisted(
    output_dir: str, listed: dict[str, Any], splits: Sequence[str], vocab: str
) -> list[str]:
    """After the manifest names this run's files, an earlier extraction's shards and
    errors files of the same splits, and every vocabulary but the one named, are deleted
    (with what killed runs left of them)."""
    out = output_dir.rstrip("/")
    stale = []
    for split in splits:
        keep = set(listed[split]["shards"]) | set(listed[split].get("errors_files", []))
        for pattern in (formats.shard_pattern(out, split), f"{out}/errors-{split}-*.parquet"):
            stale += [
                m.path
                for m in FileSystems.match([pattern])[0].metadata_list
                if posixpath.basename(m.path) not in keep
            ]
    for pattern in (f"{out}/vocab-*.txt", f"{out}/{formats.VOCAB_FILE}"):
        stale += [
            m.path
            for m in FileSystems.match([pattern])[0].metadata_list
            if posixpath.basename(m.path) != vocab
        ]
    if stale:
        FileSystems.delete(stale)
    return stale


def remove_beam_temp(output_dir: str) -> None:
    """Beam's temporary folders (`beam-temp-*`, its file sinks' staging) that a killed run
    left; a finished run's are gone already. Called with the lease held."""
    found = FileSystems.match([f"{output_dir.rstrip('/')}/beam-temp-*/**"])[0].metadata_list
    files = [m.path for m in found]
    if files:
        FileSystems.delete(files)
    if is_local(output_dir) and os.path.isdir(output_dir):
        for entry in os.listdir(output_dir):
            if entry.startswith("beam-temp-"):
                shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)


def prepare_vocab(
    args: argparse.Namespace, splits: Sequence[str], existing: dict[str, Any] | None
) -> dict[str, Any]:
    """Describes the vocabulary: this run's own file when it builds one (train) or takes
    --vocab; otherwise the one FEATURES_DIR's manifest names, which must exist at start."""
    info = {
        "file": formats.vocab_file(args.run_id),
        "built_from": "train",
        "requested_size": args.vocab_size,
        "reserved": list(RESERVED),
        "standardization": f"lowercase; replace {PUNCTUATION!r} with spaces; split on whitespace",
        "order": "frequency descending, ties alphabetical",
    }
    if "train" in splits:
        return info
    out = args.output_dir.rstrip("/")
    source = args.vocab or formats.features_vocab_path(out, existing or {})
    if not FileSystems.exists(source):
        raise UsageError(
            f"no vocabulary for split {','.join(splits)}: {source} does not exist "
            "(run the train split first or pass --vocab PATH)"
        )
    vocab = Vocabulary.load(source)
    if args.vocab:
        vocab.save(f"{out}/{info['file']}")
    else:
        info["file"] = posixpath.basename(source)
    return {**info, "size": len(vocab)}
