"""A run's pinned configuration: MODEL_DIR/config.json, and the flags a resume must keep.

The file records the model, the flags that decide the data order or the numerics,
the features' identity and vocabulary, and the epochs the learning-rate schedule
spans; a resume that changes any of them fails at start with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import keras
import tensorflow as tf

from model.defaults import PRESETS
from model.io import formats, storage
from model.text.vocab import Vocabulary

# Flags that decide the data order or the numerics: a resumed run must keep them.
RESUME_FLAGS = (
    "batch_size",
    "seed",
    "max_tokens",
    "shuffle_buffer",
    "train_split",
    "precision",
    "learning_rate",
    "warmup_steps",
    "decay",
    "clip_norm",
    "shard_policy",
    "select_by",
    "scst_samples",
    "scst_baseline",
    "scst_learning_rate",
    "scst_max_length",
    "scst_dropout",
)


def precision_policy(choice: str | None) -> str:
    """--mixed_precision -> Keras policy name (float16 needs loss scaling, bfloat16 does not)."""
    if choice is None:
        return "float32"
    if choice == "auto":
        choice = "float16" if tf.config.list_logical_devices("GPU") else "bfloat16"
    return f"mixed_{choice}"


def lr_schedule(
    peak: float, warmup: int, total: int, decay: str
) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up to `peak`, then cosine decay to 10% of it ("cosine") or flat ("constant")."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / warmup if warmup else peak,
        decay_steps=max(total - warmup, 1),
        alpha=0.1 if decay == "cosine" else 1.0,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def model_config(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    return {
        "vocab_size": vocab_size,
        "embedding_dim": args.embedding_dim or preset["embedding_dim"],
        "units": args.units or preset["units"],
        "dropout": args.dropout,
        "attention_penalty": args.attention_penalty,
        "normalize_features": not args.no_feature_norm,
    }


def training_flags(args: argparse.Namespace, global_batch: int, policy: str) -> dict[str, Any]:
    """The `RESUME_FLAGS` of this run. The self-critical flags are fixed from the run
    that starts that stage on: a cross-entropy run does not pin the rate of a
    self-critical stage added later."""
    flags = {
        k: getattr(args, k, None)
        for k in RESUME_FLAGS
        if args.scst_epochs or not k.startswith("scst_")
    }
    return {**flags, "batch_size": global_batch, "precision": policy}


def data_identity(features_manifest: dict[str, Any], vocab: Vocabulary) -> dict[str, Any]:
    """What the features are (formats.FEATURE_IDENTITY_KEYS) and the vocabulary by content:
    a checkpoint resumes only on these."""
    tokens = "\n".join(vocab.tokens).encode()
    return {
        **formats.features_identity_of(features_manifest),
        "vocab_sha256": hashlib.sha256(tokens).hexdigest(),
    }


def check_run_config(
    model_dir: str,
    model: dict[str, Any],
    training: dict[str, Any],
    chief: bool,
    data: dict[str, Any] | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Writes MODEL_DIR/config.json on a first run; checks a resume against it.

    A checkpoint of another model, a resume with a changed flag of `RESUME_FLAGS`
    or on other features or another vocabulary fails at start with one line (a changed
    batch size would silently misalign the skipped batches; another precision fails deep
    in restore; another vocabulary would train on the wrong words). Returns the record.
    """
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        record = {"model": model, "training": training, "data": data or {}}
        record["schedule"] = {"epochs": epochs}
        if chief:  # written whole: the other workers may read it at any moment
            storage.write_text(path, json.dumps(record, indent=2))
        return record
    with tf.io.gfile.GFile(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise formats.FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise formats.FormatError(f"{path}: not a JSON object")
    saved_model = saved.get("model", saved)  # before 2026-11 the file held the model alone
    diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
    if diff:
        raise formats.FormatError(
            f"{model_dir} holds a checkpoint of another model: "
            + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items())
            + " (use a new --model_dir)"
        )
    for key, value in training.items():
        if key in saved.get("training", {}) and saved["training"][key] != value:
            raise formats.FormatError(
                f"{model_dir} was trained with {key} {saved['training'][key]}, this run has "
                f"{value}: resume with the same --{_flag(key)} (or use a new --model_dir)"
            )
    if missing := {k: v for k, v in training.items() if k not in saved.get("training", {})}:
        saved = {**saved, "training": {**saved.get("training", {}), **missing}}
        if chief:  # e.g. the self-critical flags, once that stage starts
            storage.write_text(path, json.dumps(saved, indent=2))
    for key, value in (data or {}).items():
        if key in saved.get("data", {}) and saved["data"][key] != value:
            what = "a vocabulary" if key == "vocab_sha256" else f"features with {key}"
            raise formats.FormatError(
                f"{model_dir} was trained on {what} other than --data_dir's "
                f"({key} was {saved['data'][key]!r}, now {value!r}); use a new --model_dir"
            )
    return saved


def _flag(key: str) -> str:
    return {"precision": "mixed_precision"}.get(key, key)
