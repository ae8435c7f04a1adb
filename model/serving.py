"""A SavedModel that TF Serving and Vertex AI can host: image bytes in, captions out.

    python -m model.serving --model MODEL_DIR/export [--output DIR] [--beam_size K]

`serving_default` takes `images`, a `tf.string` tensor of shape [None] holding
encoded image files (JPEG, PNG, GIF (first frame), BMP, WebP), and returns
`caption` (tf.string [None]), `log_prob` (the sequence log-probability),
`token_ids` (int32 [None, max_length], `<end>` then `<pad>`), `length`,
`hit_max_length`, `attention` ([None, max_length, 64]), and the decoded
image's `width` and `height`. Decoding, alpha compositing, the JPEG DCT
shortcut, resizing, InceptionV3 and the decoding loop all run in the graph, so
`tf.saved_model.load(DIR)` needs no code of this project.

The graph reproduces `model.preprocess` with TensorFlow ops: JPEGs are decoded
at the same reduced DCT scale as PIL's draft mode, transparency is composited
on white, and the 299x299 bilinear resize is antialiased as PIL's is. It does
not apply EXIF orientation (TensorFlow cannot read it), so a photo a camera
stored sideways is captioned sideways; see the README for how often the served
captions differ from `caption_images`'.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from model import storage
from model.cli import add_decoding_flags, check_exists, decoding_settings, run_cli
from model.defaults import DEFAULT_BLOCK_REPEATS

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


def _decode_any(data: Any, size: int) -> Any:
    """Encoded bytes -> (size, size, 3) uint8 as model.preprocess makes it, and (width, height)."""
    import tensorflow as tf

    def jpeg() -> tf.Tensor:
        # PIL's draft mode: the largest DCT scale 1/2/4/8 that keeps both sides >= size.
        shape = tf.image.extract_jpeg_shape(data)
        scale = tf.minimum(shape[0] // size, shape[1] // size)
        branch = tf.reduce_sum(tf.cast(scale >= tf.constant([2, 4, 8]), tf.int32))
        decoders = [
            lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in (1, 2, 4, 8)
        ]
        return tf.switch_case(branch, decoders)

    def other() -> tf.Tensor:
        img = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
        img = tf.cast(img, tf.float32)
        channels = tf.shape(img)[-1]
        color = tf.cond(
            channels >= 3, lambda: img[..., :3], lambda: tf.repeat(img[..., :1], 3, axis=-1)
        )
        has_alpha = tf.logical_or(tf.equal(channels, 2), tf.equal(channels, 4))
        alpha = tf.cond(
            has_alpha, lambda: img[..., -1:] / 255.0, lambda: tf.ones_like(img[..., :1])
        )
        composited = color * alpha + 255.0 * (1.0 - alpha)  # on white, as PIL's alpha_composite
        return tf.cast(tf.clip_by_value(tf.round(composited), 0, 255), tf.uint8)

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    image = tf.cond(is_jpeg, jpeg, other)
    full = tf.cond(
        is_jpeg,
        lambda: tf.image.extract_jpeg_shape(data)[:2],
        lambda: tf.shape(image)[:2],
    )
    resized = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
    pixels = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return pixels, full[1], full[0]


def build_serving_archive(
    export: Any,
    precision: str = "float32",
    beam_size: int = 1,
    length_penalty: float = 0.0,
    allow_unk: bool = False,
    block_repeats: int = DEFAULT_BLOCK_REPEATS,
) -> Any:
    """A keras.export.ExportArchive with the `serving_default` endpoint for `export`."""
    import keras
    import tensorflow as tf

    from model.decoding import decode_graph
    from model.extractor import build_feature_extractor
    from model.preprocess import IMAGE_SIZE

    extractor = build_feature_extractor(
        export.extractor_weights(), precision, export.extractor_variant
    )
    model, max_length = export.model, export.max_length
    vocab = tf.constant(list(export.vocab.tokens))

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels, width, height = tf.map_fn(
            lambda data: _decode_any(data, IMAGE_SIZE),
            images,
            fn_output_signature=(
                tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ),
        )
        # The float16 round trip of stage 1's stored features, as caption_images does.
        features = tf.cast(tf.cast(extractor(pixels, training=False), tf.float16), tf.float32)
        out = decode_graph(
            model, features, max_length, beam_size, length_penalty, allow_unk, block_repeats
        )
        words = tf.RaggedTensor.from_tensor(out["token_ids"], lengths=out["lengths"])
        return {
            "caption": tf.strings.reduce_join(tf.gather(vocab, words), axis=1, separator=" "),
            "log_prob": tf.reduce_sum(out["log_probs"], axis=1),
            "token_ids": out["token_ids"],
            "length": out["lengths"],
            "hit_max_length": out["hit_max_length"],
            "attention": out["attention"],
            "width": width,
            "height": height,
        }

    archive = keras.export.ExportArchive()
    archive.track(extractor)
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
    )
    return archive


def write_serving_export(
    export_dir: str,
    output: str | None = None,
    precision: str | None = None,
    decoding: dict[str, Any] | None = None,
) -> str:
    """Builds the serving SavedModel of the export at `export_dir`; returns its path."""
    from model.export import load_export

    export = load_export(export_dir)
    precision = precision or export.features.get("precision", "float32")
    path = output or serving_path(export_dir)
    decoding = {**DEFAULT_DECODING, **(decoding or {})}
    archive = build_serving_archive(export, precision, **decoding)
    archive.write_out(path, verbose=False)
    # What the graph does, beside it: the SavedModel itself cannot say.
    record = {"model_id": export.model_id, "precision": precision, "decoding": decoding}
    storage.write_text(f"{path.rstrip('/')}/{SERVING_RECORD}", json.dumps(record, indent=2))
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument("--output", help="default: MODEL_DIR/export/serving")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"))
    add_decoding_flags(p)
    p.add_argument("--verbose", action="store_true", help="TensorFlow's start-up log too")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    check_exists("--model", args.model)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    path = write_serving_export(args.model, args.output, args.precision, decoding_settings(args))
    print(f"serving: wrote {path} (serving_default: images -> caption, log_prob, token_ids)")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
