"""Encoded image bytes to InceptionV3 input: the one preprocessing path of every stage.

Decode with PIL (EXIF orientation applied, first frame of animations), convert
any mode to RGB, resize to 299x299 bilinear; the result stays uint8 (4x less
memory and copying than float32 between Beam steps). The feature extractor
scales it to [-1, 1] in its graph, as InceptionV3's `preprocess_input` does.
Feature extraction and bulk
captioning both call `preprocess_image`, so features never differ between them.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

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
class Decoded:
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


def preprocess_image(data: bytes, size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Encoded bytes -> (size, size, 3) uint8 extractor input, plus the original size."""
    img, (width, height) = decode_image(data, max_pixels=max_pixels, draft_size=size)
    resized = img.resize((size, size), Image.BILINEAR)
    return Decoded(np.asarray(resized), width, height)
