"""A SavedModel that TF Serving and Vertex AI can host: image bytes in, captions out.

    python -m model.serving --model MODEL_DIR/export [--output DIR] [--beam_size K]

`serving_default` takes `images`, a `tf.string` tensor of shape [None] holding
encoded image files (JPEG, PNG, GIF (first frame), BMP, WebP), and returns
`caption` (tf.string [None]), `error` ("" or the error type of an image that could
not be captioned, whose caption is then empty: too_large, decompression_bomb,
unsupported_format (TIFF, which the graph cannot decode), not_an_image),
`log_prob` (the sequence log-probability), `token_ids` (int32 [None, max_length],
`<end>` then `<pad>`), `length`, `hit_max_length`, `attention` ([None, max_length,
64]), and the decoded image's `width` and `height`. Decoding, alpha compositing, the JPEG DCT
shortcut, resizing, InceptionV3 and the decoding loop all run in the graph, so
`tf.saved_model.load(DIR)` needs no code of this project. The graph reads each
image's size from its header before allocating its pixels: `--max_pixels` and
`--max_bytes` bound the memory a request can take, as in the Beam jobs.

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
from model.cli import (
    add_decoding_flags,
    check_exists,
    decoding_settings,
    positive_int,
    run_cli,
)
from model.defaults import DEFAULT_BLOCK_REPEATS, MAX_BYTES, MAX_PIXELS

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


# The `error` output of an image that could not be captioned ("" for the others): the
# error types of the caption tables, decided in the graph.
SERVING_ERRORS = ("", "too_large", "decompression_bomb", "unsupported_format", "not_an_image")


def _header_size(data: Any) -> Any:
    """(width, height) int64 from an image file's header, read before any pixel is
    decoded; (-1, -1) for a format the graph does not decode (TIFF, ...)."""
    import tensorflow as tf

    def byte(i: int) -> tf.Tensor:
        return tf.cast(tf.io.decode_raw(tf.strings.substr(data, i, 1), tf.uint8)[0], tf.int64)

    def le(i: int, n: int) -> tf.Tensor:
        return tf.add_n([byte(i + k) * (1 << (8 * k)) for k in range(n)])

    def be(i: int, n: int) -> tf.Tensor:
        return tf.add_n([byte(i + k) * (1 << (8 * (n - 1 - k))) for k in range(n)])

    def jpeg() -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)  # the header only
        return shape[1], shape[0]

    def webp() -> tuple[tf.Tensor, tf.Tensor]:
        chunk = tf.strings.substr(data, 12, 4)
        return tf.case(
            [
                (tf.equal(chunk, b"VP8X"), lambda: (1 + le(24, 3), 1 + le(27, 3))),
                (
                    tf.equal(chunk, b"VP8L"),
                    lambda: (
                        1 + byte(21) + (byte(22) % 64) * 256,
                        1 + byte(22) // 64 + byte(23) * 4 + (byte(24) % 16) * 1024,
                    ),
                ),
                (tf.equal(chunk, b"VP8 "), lambda: (le(26, 2) % 16384, le(28, 2) % 16384)),
            ],
            default=lambda: (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64)),
        )

    head = tf.strings.substr(data, 0, 4)
    unknown = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64))
    return tf.case(
        [
            (tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"), jpeg),
            (tf.equal(head, b"\x89PNG"), lambda: (be(16, 4), be(20, 4))),
            (tf.equal(head, b"GIF8"), lambda: (le(6, 2), le(8, 2))),
            (
                tf.equal(tf.strings.substr(data, 0, 2), b"BM"),
                lambda: (le(18, 4), tf.abs(le(22, 4) - (le(22, 4) // (1 << 31)) * (1 << 32))),
            ),
            (
                tf.logical_and(
                    tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(data, 8, 4), b"WEBP")
                ),
                webp,
            ),
        ],
        default=lambda: unknown,
    )


def decode_bounded(images: Any, size: int, max_pixels: int, max_bytes: int) -> Any:
    """Encoded images [N] -> pixels (N, size, size, 3) uint8, width, height (int32) and
    `error` (tf.string, "" or one of SERVING_ERRORS): sizes are checked from the header
    before any pixel buffer is allocated, and a file that fails to decode is that image's
    error, not the request's (tf.data's `ignore_errors` drops it; its index is missing)."""
    import tensorflow as tf

    def one(index: tf.Tensor, data: tf.Tensor) -> tuple[tf.Tensor, ...]:
        width, height = _header_size(data)
        magic = tf.strings.substr(data, 0, 4)
        is_tiff = tf.logical_or(tf.equal(magic, b"II*\x00"), tf.equal(magic, b"MM\x00*"))
        code = tf.case(
            [
                (tf.strings.length(data) > max_bytes, lambda: tf.constant(1)),
                (width < 0, lambda: tf.where(is_tiff, 3, 4)),  # other formats: not images
                (
                    tf.cast(width, tf.float64) * tf.cast(height, tf.float64) > max_pixels,
                    lambda: tf.constant(2),
                ),
            ],
            default=lambda: tf.constant(0),
        )

        def decode() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return _decode_any(data, size)

        def refuse() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return tf.zeros([size, size, 3], tf.uint8), tf.constant(0), tf.constant(0)

        pixels, w, h = tf.cond(tf.equal(code, 0), decode, refuse)
        pixels = tf.ensure_shape(pixels, [size, size, 3])
        return index, pixels, tf.cast(w, tf.int32), tf.cast(h, tf.int32), code

    n = tf.shape(images)[0]
    decoded = (
        tf.data.Dataset.from_tensor_slices((tf.range(n), images))
        .map(one)
        .ignore_errors()
        # One placeholder element, so that a request where every image fails batches too.
        .concatenate(
            tf.data.Dataset.from_tensors(
                (-1, tf.zeros([size, size, 3], tf.uint8), 0, 0, tf.constant(0))
            )
        )
        .batch(1 << 30)
        .get_single_element()
    )
    index, pixels, width, height, code = decoded
    keep = index >= 0
    at = tf.boolean_mask(index, keep)[:, None]

    def placed(x: tf.Tensor, shape: list) -> tf.Tensor:
        dims = tf.concat([[n], tf.constant(shape, tf.int32)], 0)
        return tf.scatter_nd(at, tf.boolean_mask(x, keep), dims)

    found = tf.scatter_nd(at, tf.ones_like(at[:, 0]), [n]) > 0
    code = tf.where(found, placed(code, []), len(SERVING_ERRORS) - 1)  # dropped: not_an_image
    error = tf.gather(tf.constant(SERVING_ERRORS), code)
    return placed(pixels, [size, size, 3]), placed(width, []), placed(height, []), error


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

    from model.decoding import decode_graph
    from model.extractor import build_feature_extractor
    from model.preprocess import IMAGE_SIZE

    extractor = build_feature_extractor(
        export.extractor_weights(), precision, export.extractor_variant
    )
    model, max_length = export.model, export.max_length
    vocab = tf.constant(list(export.vocab.tokens))

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
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
        return {
            "caption": tf.where(failed, "", captions),
            "error": error,
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
    limits: dict[str, Any] | None = None,
) -> str:
    """Builds the serving SavedModel of the export at `export_dir`; returns its path.
    `limits`: max_pixels, max_bytes, strict (build_serving_archive's defaults)."""
    from model.export import load_export

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument("--output", help="default: MODEL_DIR/export/serving")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"))
    add_decoding_flags(p)
    p.add_argument(
        "--max_pixels",
        type=positive_int,
        default=MAX_PIXELS,
        help="larger images (from the file header, before decoding) get error decompression_bomb",
    )
    p.add_argument(
        "--max_bytes", type=positive_int, default=MAX_BYTES, help="larger files get error too_large"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an image that cannot be captioned fails the whole request (default: its error "
        "output says why and its caption is empty)",
    )
    p.add_argument("--verbose", action="store_true", help="TensorFlow's start-up log too")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    check_exists("--model", args.model)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    limits = {"max_pixels": args.max_pixels, "max_bytes": args.max_bytes, "strict": args.strict}
    path = write_serving_export(
        args.model, args.output, args.precision, decoding_settings(args), limits
    )
    print(f"serving: wrote {path} (serving_default: images -> caption, error, log_prob, ...)")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
