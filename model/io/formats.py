"""The one definition of every on-disk contract between the stages.

Features (TFRecord Example per image), manifests (versioned JSON), the model
export layout, and the Parquet captions/errors schemas. Every reader goes
through `read_manifest`, which fails with one line on a mismatch.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from model.io import storage

FORMAT_VERSION = 1

# --- Features (stage 1 -> stage 2) -------------------------------------------
BACKBONE = "inception_v3"
BACKBONE_LAYER = "mixed10"
FEATURE_SHAPE = (64, 2048)  # mixed10 is 8x8x2048; stored flattened over locations
FEATURE_DTYPE = "float16"
VOCAB_FILE = "vocab.txt"
MANIFEST_FILE = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"  # .gz means GZIP on both the Beam and tf.data side

KEY_ID = "image/id"
KEY_FILE = "image/file_name"
KEY_FEATURES = "image/features"
KEY_SHAPE = "image/feature_shape"
KEY_CAPTIONS = "image/captions"
KEY_WIDTH = "image/width"
KEY_HEIGHT = "image/height"


class FormatError(ValueError):
    """An artifact does not match the contract this code reads (one-line message)."""


def shard_prefix(output_dir: str, split: str) -> str:
    """Prefix of a split's shards; the sink appends -SSSSS-of-NNNNN."""
    return posixpath.join(output_dir, split) if "://" in output_dir else f"{output_dir}/{split}"


def shard_pattern(data_dir: str, split: str) -> str:
    """Every shard of a split, of any extraction: `{split}-[RUN_ID-]SSSSS-of-NNNNN`."""
    return f"{data_dir.rstrip('/')}/{split}-*-of-*{SHARD_SUFFIX}"


def vocab_file(run_id: str) -> str:
    """The vocabulary an extraction writes, named by its run: never overwritten in place."""
    return f"vocab-{run_id}.txt"


def features_vocab_path(data_dir: str, manifest: Mapping[str, Any]) -> str:
    """FEATURES_DIR's vocabulary, as its manifest names it (`vocab.txt` before 2026-12)."""
    return f"{data_dir.rstrip('/')}/{(manifest.get('vocab') or {}).get('file', VOCAB_FILE)}"


def feature_spec() -> dict[str, Any]:
    """tf.io.parse_example spec for one feature record (imports TF lazily)."""
    import tensorflow as tf

    return {
        KEY_ID: tf.io.FixedLenFeature([], tf.int64),
        KEY_FILE: tf.io.FixedLenFeature([], tf.string),
        KEY_FEATURES: tf.io.FixedLenFeature([], tf.string),
        KEY_SHAPE: tf.io.FixedLenFeature([2], tf.int64),
        KEY_CAPTIONS: tf.io.VarLenFeature(tf.string),
        KEY_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        KEY_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }


def make_example(
    image_id: int,
    file_name: str,
    features: np.ndarray,
    captions: Sequence[str],
    width: int = 0,
    height: int = 0,
) -> bytes:
    """Serialises one image's record: float16 little-endian features + raw captions."""
    import tensorflow as tf

    feats = np.ascontiguousarray(features, dtype="<f2").reshape(FEATURE_SHAPE)

    def b(values: Sequence[bytes]) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

    def i(values: Sequence[int]) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                KEY_ID: i([int(image_id)]),
                KEY_FILE: b([file_name.encode("utf-8")]),
                KEY_FEATURES: b([feats.tobytes()]),
                KEY_SHAPE: i(list(FEATURE_SHAPE)),
                KEY_CAPTIONS: b([c.encode("utf-8") for c in captions]),
                KEY_WIDTH: i([int(width)]),
                KEY_HEIGHT: i([int(height)]),
            }
        )
    )
    return example.SerializeToString()


def parse_example(serialized: bytes) -> dict[str, Any]:
    """Python-side parse of one record (tests, tools); the trainer uses `feature_spec`."""
    import tensorflow as tf

    f = tf.train.Example.FromString(serialized).features.feature
    shape = tuple(f[KEY_SHAPE].int64_list.value)
    return {
        "image_id": f[KEY_ID].int64_list.value[0],
        "file_name": f[KEY_FILE].bytes_list.value[0].decode("utf-8"),
        "features": np.frombuffer(f[KEY_FEATURES].bytes_list.value[0], "<f2").reshape(shape),
        "captions": [c.decode("utf-8") for c in f[KEY_CAPTIONS].bytes_list.value],
        "width": f[KEY_WIDTH].int64_list.value[0],
        "height": f[KEY_HEIGHT].int64_list.value[0],
    }


# --- Manifests ---------------------------------------------------------------
KIND_FEATURES = "features"
KIND_EXPORT = "model_export"
KIND_CAPTIONS = "captions"


def write_manifest(path: str, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **body}
    storage.write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(path: str, kind: str) -> dict[str, Any]:
    """Reads and checks a manifest; raises FormatError with a one-line reason."""
    try:
        with storage.open_file(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: no {kind} manifest here") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path}: manifest is not a JSON object")
    if manifest.get("kind") != kind:
        raise FormatError(f"{path}: expected a {kind} manifest, found {manifest.get('kind')!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {manifest.get('format_version')} "
            f"but this code reads version {FORMAT_VERSION}"
        )
    return manifest


def check_backbone(manifest: Mapping[str, Any], where: str) -> None:
    """Fails if a features manifest describes another backbone or feature shape."""
    got = (
        manifest.get("backbone"),
        manifest.get("layer"),
        tuple(manifest.get("feature_shape", ())),
    )
    want = (BACKBONE, BACKBONE_LAYER, FEATURE_SHAPE)
    if got != want:
        raise FormatError(f"{where}: features from {got}, but this code uses {want}")


# Fields that say how features were computed (anything that changes the numbers);
# every split of FEATURES_DIR and every reader must match all of them.
FEATURE_IDENTITY_KEYS = (
    "backbone",
    "variant",  # "keras" or "2015" (model.images.extractor)
    "layer",
    "weights_hash",  # by content: a moved or copied file is the same weights
    "weights_seed",
    "image_size",
    "preprocessing",
    "precision",
    "runtime",  # "tensorflow" or "openvino" (model.images.runtimes); older manifests: none
    "calibration",  # the int8 encoder's calibration id (model.images.calibrate), else null
    "feature_shape",
)
# What an identity field missing from an older manifest means.
IDENTITY_DEFAULTS = {"runtime": "tensorflow", "calibration": None}


# An int8 encoder's folder (model.images.calibrate): encoder.xml, encoder.bin and this.
CALIBRATION_FILE = "calibration.json"


def read_calibration(path: str) -> dict[str, Any]:
    """The record of an int8 encoder's folder (its id, weights, photos); one line when
    the folder holds none."""
    where = f"{path.rstrip('/')}/{CALIBRATION_FILE}"
    if not storage.exists(where):
        raise FormatError(
            f"--calibration {path}: no {CALIBRATION_FILE} there; make one with "
            "python -m model.images.calibrate"
        )
    with storage.open_file(where, "r") as f:
        return json.load(f)


def features_identity_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The identity fields of a features manifest (or of an export's `features`)."""
    return {key: manifest.get(key, IDENTITY_DEFAULTS.get(key)) for key in FEATURE_IDENTITY_KEYS}


# The identity fields that say how the extractor computed (not which network): a model
# captions features that differ only in these (caption_images --precision, evaluate
# --any_precision), with captions that may differ in a few words.
COMPUTE_KEYS = ("precision", "runtime", "calibration")


def features_mismatch(
    expected: Mapping[str, Any], actual: Mapping[str, Any], ignore: Sequence[str] = ()
) -> tuple[str, Any, Any] | None:
    """(key, expected value, actual value) of the first identity field (but `ignore`) on
    which two features manifests differ, None when they describe the same features: the
    one check behind every reader's refusal (evaluate, extract into an existing dir, train
    resume)."""
    expected, actual = features_identity_of(expected), features_identity_of(actual)
    for key in FEATURE_IDENTITY_KEYS:
        if key not in ignore and expected[key] != actual[key]:
            return key, expected[key], actual[key]
    return None


def features_manifest_path(data_dir: str) -> str:
    return f"{data_dir.rstrip('/')}/{MANIFEST_FILE}"


# --- Model export (stage 2 -> stages 3 and evaluation) ----------------------
EXPORT_DIR = "export"
EXPORT_MODEL_FILE = "captioner.keras"
EXPORT_EXTRACTOR_WEIGHTS = "extractor.weights.h5"


def export_paths(export_dir: str) -> dict[str, str]:
    d = export_dir.rstrip("/")
    return {
        "model": f"{d}/{EXPORT_MODEL_FILE}",
        "vocab": f"{d}/{VOCAB_FILE}",
        "manifest": f"{d}/{MANIFEST_FILE}",
        "extractor_weights": f"{d}/{EXPORT_EXTRACTOR_WEIGHTS}",
    }


# --- Captions (stage 3 output) -----------------------------------------------
# CAPTIONS_DIR is a Delta Lake table of these rows, one per input: captioned (error_type
# null) or failed (caption null, error_type and message set). Each row names its run and
# how it was decoded, so a table that mixes runs still describes every row truly.
CAPTION_TABLE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # path or URL; archive members as ARCHIVE_URI!/member
        ("key", pa.string()),  # the input's identity (the uri unless a table names one)
        ("caption", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("log_prob", pa.float32()),
        ("length", pa.int32()),
        ("hit_max_length", pa.bool_()),
        ("repeated_trigram", pa.bool_()),  # the caption repeats a word trigram (looping)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("model_id", pa.string()),
        ("precision", pa.string()),
        ("beam_size", pa.int32()),
        ("length_penalty", pa.float32()),
        ("block_repeats", pa.int32()),
        ("allow_unk", pa.bool_()),
        ("run_id", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def caption_table_schema(kept: Any = ()) -> pa.Schema:
    """The caption table's columns, then the input table's kept columns (`kept`: pyarrow
    fields, in --keep_columns order)."""
    schema = CAPTION_TABLE_SCHEMA
    for field in kept:
        schema = schema.append(field)
    return schema


# The columns that say how a row was made: --skip_existing refuses to add rows that
# differ in any of them from the table's (unless --allow_mixed_models).
CAPTION_SETTINGS_COLUMNS = (
    "model_id",
    "precision",
    "beam_size",
    "length_penalty",
    "block_repeats",
    "allow_unk",
)

# The errors of a features run (FEATURES_DIR/errors-{split}-*.parquet).
ERRORS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)

PARQUET_CODEC = "zstd"
# Error types that may not happen again (a network read, a model batch that ran out of
# memory): --skip_existing tries these inputs again instead of skipping them.
TRANSIENT_ERRORS = (
    "read_error",
    "inference_error",
    "http_timeout",
    "http_connection",
    "http_408",
    "http_429",
    "http_500",
    "http_502",
    "http_503",
    "http_504",
)
