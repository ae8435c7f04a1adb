"""Writes and loads `MODEL_DIR/export/`: everything the captioner needs, and nothing else.

Layout (see `model.io.formats.export_paths`): `captioner.keras` (config + weights),
`vocab.txt`, `manifest.json` (embeds the features manifest, so stage 3
computes features exactly as training saw them, plus decoding defaults and a
model id), and `extractor.weights.h5` when the features came from a weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from model.defaults import DEFAULT_MAX_LENGTH
from model.images.extractor import local_weights_file
from model.io import formats, storage
from model.network.captioner import ShowAttendTell
from model.text.vocab import Vocabulary


@dataclass
class Export:
    """A loaded export: the model, its vocabulary and manifest."""

    model: ShowAttendTell
    vocab: Vocabulary
    manifest: dict[str, Any]
    path: str

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def max_length(self) -> int:
        return int(self.manifest["decoding"]["max_length"])

    @property
    def features(self) -> dict[str, Any]:
        return self.manifest["features"]

    def extractor_weights(self) -> str:
        """The --weights value that rebuilds the training-time feature extractor."""
        weights = self.features["weights"]
        if weights in ("imagenet", "none"):
            return weights
        return formats.export_paths(self.path)["extractor_weights"]

    @property
    def extractor_variant(self) -> str:
        """The backbone variant the features were computed with (model.images.extractor)."""
        return self.features.get("variant") or "keras"


def model_id(
    model: ShowAttendTell,
    vocab: Vocabulary,
    decoding: dict[str, Any],
    features_manifest: dict[str, Any],
) -> str:
    """16 hex digits that name what the export computes: its weights (by path, shape,
    dtype and bytes), architecture, vocabulary, decoding settings and how its input
    features are made. Equal for equal weights, whenever and however often it is saved
    (the `.keras` zip itself holds a save timestamp)."""
    h = hashlib.sha256()
    identity = {
        "model": model.config.to_dict(),
        "vocab": list(vocab.tokens),
        "decoding": decoding,
        "features": formats.features_identity_of(features_manifest),
    }
    h.update(json.dumps(identity, sort_keys=True).encode())
    for w in sorted(model.weights, key=lambda w: w.path):
        value = np.ascontiguousarray(w.numpy())
        h.update(f"\n{w.path} {value.dtype} {value.shape}\n".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:16]


def save_export(
    model: ShowAttendTell,
    vocab: Vocabulary,
    features_manifest: dict[str, Any],
    export_dir: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Saves a float32 copy of `model` with its vocabulary and manifest."""
    if len(vocab) != model.config.vocab_size:
        raise formats.FormatError(
            f"vocabulary has {len(vocab)} tokens "
            f"but the model was built for {model.config.vocab_size}"
        )
    paths = formats.export_paths(export_dir)
    storage.makedirs(export_dir)
    # Export in float32 whatever the training policy, so any machine can serve it.
    serving = ShowAttendTell(**model.config.to_dict(), dtype="float32", name="show_attend_tell")
    serving.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, formats.EXPORT_MODEL_FILE)
        serving.save(local)
        storage.copy_from_local(local, paths["model"])
    vocab.save(paths["vocab"])
    weights = features_manifest.get("weights", "none")
    if weights not in ("imagenet", "none"):
        storage.copy_from_local(local_weights_file(weights), paths["extractor_weights"])
    decoding = {"strategy": "greedy", "max_length": int(max_length)}
    body = {
        "model_id": model_id(serving, vocab, decoding, features_manifest),
        "model": model.config.to_dict(),
        "vocab_size": len(vocab),
        "decoding": decoding,
        "features": features_manifest,
        "training": training or {},
    }
    return formats.write_manifest(paths["manifest"], formats.KIND_EXPORT, body)


def load_export(export_dir: str) -> Export:
    """Loads an export, failing with one line if it is incomplete or incompatible."""
    paths = formats.export_paths(export_dir)
    manifest = formats.read_manifest(paths["manifest"], formats.KIND_EXPORT)
    formats.check_backbone(manifest["features"], paths["manifest"])
    vocab = Vocabulary.load(paths["vocab"])
    if len(vocab) != manifest["vocab_size"]:
        raise formats.FormatError(
            f"{paths['vocab']}: {len(vocab)} tokens but the manifest says {manifest['vocab_size']}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, formats.EXPORT_MODEL_FILE)
        try:
            storage.copy_to_local(paths["model"], local)
        except FileNotFoundError:
            raise formats.FormatError(f"{paths['model']}: model file missing from export") from None
        model = keras.models.load_model(local, safe_mode=True, compile=False)
    return Export(model=model, vocab=vocab, manifest=manifest, path=export_dir.rstrip("/"))
