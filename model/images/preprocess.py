"""Encoded image bytes to InceptionV3 input: the one preprocessing path of every stage.

Decode with PIL (EXIF orientation applied, first frame of animations), convert
any mode to RGB, resize to 299x299 bilinear; the result stays uint8 (4x less
memory and copying than float32 between Beam steps). The feature extractor
scales it to [-1, 1] in its graph, as InceptionV3's `preprocess_input` does.
Feature extraction and bulk captioning both call `preprocess_image`, so features
never differ between them.

Its TensorFlow twin, `decode_bounded` (at the end of this file), is the same path as
ops of the serving graph: the size read from the header before any pixel buffer is
allocated, JPEGs decoded at PIL's draft-mode DCT scale, alpha composited on white, an
antialiased bilinear resize. It cannot read EXIF orientation. tests/test_serving.py
checks the two agree within one level on every format.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.defaults import MAX_PIXELS

# The size check is ours (`max_pixels`, right after the header is read): PIL's own, a
# process-wide warning that `warnings.catch_warnings` cannot silence safely while decode
# threads run, printed DecompressionBombWarning lines for files that became error rows.
Image.MAX_IMAGE_PIXELS = None

IMAGE_SIZE = 299
PREPROCESSING = "pil-exif-rgb-white-alpha-bilinear-299-inception[-1,1]"

_ORIENTATION = 0x0112  # EXIF tag
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An input that cannot be captioned; `kind` becomes the error_type column."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PreprocessedImage:
    """A preprocessed image: `pixels` (size, size, 3) uint8 RGB, resized."""

    pixels: np.ndarray
    width: int  # after EXIF orientation, before resizing
    height: int


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        # 16-bit files use the full 0..65535 range; 'I'/'F' images are scaled by their peak.
        peak = 65535.0 if img.mode in _SIXTEEN_BIT else max(float(arr.max()), 255.0)
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(
    data: bytes, max_pixels: int = MAX_PIXELS, draft_size: int = 0
) -> tuple[Image.Image, tuple[int, int]]:
    """Decodes bytes to an upright RGB image and its upright full size, or raises ImageError.

    Args:
      data: the encoded file.
      max_pixels: larger images are refused as decompression bombs before decoding.
      draft_size: if set, JPEGs are decoded at the smallest DCT scale that is still
        at least this size, which makes big photos several times cheaper.
    """
    if not data:
        raise ImageError("empty", "file is empty")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        orientation = img.getexif().get(_ORIENTATION, 1)
        if orientation in (5, 6, 7, 8):
            w, h = h, w  # rotated by 90 degrees once upright
        img.seek(0)
        img.load()
        if orientation != 1:  # exif_transpose copies even when there is nothing to do
            img = ImageOps.exif_transpose(img)
        return to_rgb(img), (w, h)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageError(kind, f"{type(e).__name__}: {e}") from None
    except (ValueError, SyntaxError, EOFError, IndexError, struct.error, MemoryError) as e:
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None


def preprocess_image(
    data: bytes, size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS
) -> PreprocessedImage:
    """Encoded bytes -> (size, size, 3) uint8 extractor input, plus the original size."""
    img, (width, height) = decode_image(data, max_pixels=max_pixels, draft_size=size)
    resized = img.resize((size, size), Image.BILINEAR)
    return PreprocessedImage(np.asarray(resized), width, height)


# The TensorFlow twin: the same preprocessing as ops of the serving graph
# (model.inference.saved_model). tests/test_preprocess.py checks that the two agree.


def decode_in_graph(data: Any, size: int) -> Any:
    """Encoded bytes -> (size, size, 3) uint8 as `preprocess_image` makes it, width, height."""
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
# The error kinds the serving graph tells apart, by code: the Beam jobs' names for them.
SERVING_ERRORS = (
    "",
    "too_large",
    "decompression_bomb",
    "unsupported_format",
    "not_an_image",
    "truncated",
    "corrupt",
    "empty",
)
# (first bytes, last bytes) of the formats the graph decodes: a file that starts as one
# of them, fails to decode and lacks the format's ending was cut short.
_FORMAT_ENDS = (
    (b"\xff\xd8", b"\xff\xd9"),  # JPEG: SOI ... EOI
    (b"\x89PNG", b"IEND\xaeB`\x82"),  # PNG: the IEND chunk and its CRC
    (b"GIF8", b";"),  # GIF: the trailer
    (b"BM", b""),
    (b"RIFF", b""),
)


def undecoded_error(data: Any) -> Any:
    """The SERVING_ERRORS code of a file the graph's decoder failed on, as PIL would name
    the failure: `empty`, `truncated` (a known format without its ending), `corrupt` (a
    known format otherwise) or `not_an_image`."""
    import tensorflow as tf

    n = tf.strings.length(data)
    known, cut = tf.constant(False), tf.constant(False)
    for head, tail in _FORMAT_ENDS:
        starts = tf.equal(tf.strings.substr(data, 0, len(head)), head)
        ends = tf.equal(tf.strings.substr(data, tf.maximum(n - len(tail), 0), len(tail)), tail)
        known = tf.logical_or(known, starts)
        cut = tf.logical_or(cut, tf.logical_and(starts, tf.logical_not(ends)))
    code = SERVING_ERRORS.index
    return tf.case(
        [
            (tf.equal(n, 0), lambda: tf.constant(code("empty"))),
            (cut, lambda: tf.constant(code("truncated"))),
            (known, lambda: tf.constant(code("corrupt"))),
        ],
        default=lambda: tf.constant(code("not_an_image")),
    )


def header_size_in_graph(data: Any) -> Any:
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
        width, height = header_size_in_graph(data)
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
            return decode_in_graph(data, size)

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
    dropped = tf.map_fn(undecoded_error, images, fn_output_signature=tf.int32)
    code = tf.where(found, placed(code, []), dropped)
    error = tf.gather(tf.constant(SERVING_ERRORS), code)
    return placed(pixels, [size, size, 3]), placed(width, []), placed(height, []), error
