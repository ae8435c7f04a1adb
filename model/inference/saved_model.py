"""The serving SavedModel: image bytes in, captions out, no code of this project needed.

Built by `python -m model.serving` (the command; its docstring lists the endpoint's
inputs and outputs) and at the end of `python -m model.train`. Images are decoded by
`model.images.preprocess.decode_bounded`, the graph twin of the Beam jobs' PIL path.
"""

from __future__ import annotations

import json
from typing import Any

from model.defaults import DEFAULT_BLOCK_REPEATS, MAX_BYTES, MAX_PIXELS
from model.io import storage

# The decoding settings of a serving graph built without flags, as add_decoding_flags' defaults.
DEFAULT_DECODING = {
    "beam_size": 1,
    "length_penalty": 0.0,
    "allow_unk": False,
    "block_repeats": DEFAULT_BLOCK_REPEATS,
}
SERVING_RECORD = "serving.json"  # beside saved_model.pb: model id, precision, decoding

SERVING_DIR = "serving"


def serving_path(export_dir: str) -> str:
    return f"{export_dir.rstrip('/')}/{SERVING_DIR}"


def build_serving_archive(
    export: Any,
    precision: str = "float32",
    beam_size: int = 1,
    length_penalty: float = 0.0,
    allow_unk: bool = False,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    strict: bool = False,
) -> Any:
    """A keras.export.ExportArchive with the `serving_default` endpoint for `export`.

    An image that cannot be captioned gets its `error` and an empty caption; with
    `strict`, it fails the whole request (InvalidArgument) instead."""
    import keras
    import tensorflow as tf

    from model.decoding.decoders import decode_graph
    from model.images.extractor import build_feature_extractor
    from model.images.preprocess import IMAGE_SIZE, decode_bounded

    extractor = build_feature_extractor(
        export.extractor_weights(), precision, export.extractor_variant
    )
    model, max_length = export.model, export.max_length
    vocab = tf.constant(list(export.vocab.tokens))

    def caption(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels, width, height, error = decode_bounded(images, IMAGE_SIZE, max_pixels, max_bytes)
        failed = tf.not_equal(error, "")
        if strict:
            tf.debugging.assert_equal(
                tf.reduce_any(failed), False, message="an image could not be captioned"
            )
        # The float16 round trip of stage 1's stored features, as caption_images does.
        features = tf.cast(tf.cast(extractor(pixels, training=False), tf.float16), tf.float32)
        out = decode_graph(
            model, features, max_length, beam_size, length_penalty, allow_unk, block_repeats
        )
        words = tf.RaggedTensor.from_tensor(out["token_ids"], lengths=out["lengths"])
        captions = tf.strings.reduce_join(tf.gather(vocab, words), axis=1, separator=" ")
        outputs = {
            "caption": captions,
            "log_prob": tf.reduce_sum(out["log_probs"], axis=1),
            "token_ids": out["token_ids"],
            "length": out["lengths"],
            "hit_max_length": out["hit_max_length"],
            "attention": out["attention"],
        }
        # A failed image has an error and nothing else: no caption of the blank it became.
        outputs = {k: blank_where(failed, v) for k, v in outputs.items()}
        return {**outputs, "error": error, "width": width, "height": height}

    locations = model.config.feature_shape[0]

    def nothing(images: tf.Tensor) -> dict[str, tf.Tensor]:
        """An empty request's answer: every output with 0 rows."""
        none = {"caption": tf.string, "error": tf.string, "log_prob": tf.float32}
        none |= {"length": tf.int32, "hit_max_length": tf.bool}
        none |= {"width": tf.int32, "height": tf.int32}
        out = {k: tf.zeros([0], dtype) for k, dtype in none.items()}
        out["token_ids"] = tf.zeros([0, max_length], tf.int32)
        out["attention"] = tf.zeros([0, max_length, locations], tf.float32)
        return out

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return tf.cond(tf.size(images) > 0, lambda: caption(images), lambda: nothing(images))

    archive = keras.export.ExportArchive()
    archive.track(extractor)
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
    )
    return archive


def blank_where(failed: Any, value: Any) -> Any:
    """`value` (B, ...) with the rows of `failed` (B,) set to zero ("", False)."""
    import tensorflow as tf

    mask = tf.reshape(failed, [-1] + [1] * (value.shape.rank - 1))
    return tf.where(mask, tf.zeros_like(value), value)


def write_serving_export(
    export_dir: str,
    output: str | None = None,
    precision: str | None = None,
    decoding: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> str:
    """Builds the serving SavedModel of the export at `export_dir`; returns its path.
    `limits`: max_pixels, max_bytes, strict (build_serving_archive's defaults)."""
    from model.network.export import load_export

    export = load_export(export_dir)
    precision = precision or export.features.get("precision", "float32")
    path = output or serving_path(export_dir)
    decoding = {**DEFAULT_DECODING, **(decoding or {})}
    limits = {"max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES, "strict": False, **(limits or {})}
    archive = build_serving_archive(export, precision, **decoding, **limits)
    archive.write_out(path, verbose=False)
    # What the graph does, beside it: the SavedModel itself cannot say.
    record = {
        "model_id": export.model_id,
        "precision": precision,
        "decoding": decoding,
        "limits": limits,
    }
    storage.write_text(f"{path.rstrip('/')}/{SERVING_RECORD}", json.dumps(record, indent=2))
    return path
