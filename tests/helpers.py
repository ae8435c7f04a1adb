"""Generated test images: every mode the system must caption and every kind of bad file."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(color=(200, 30, 30), size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def good_images() -> dict[str, bytes]:
    """One file per mode the system must accept, named by what it exercises."""
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))  # fully transparent blue
    palette = solid((10, 200, 10)).convert("P", palette=Image.ADAPTIVE)
    palette_alpha = Image.new("P", (32, 32), 0)
    palette_alpha.putpalette([255, 0, 0] * 256)
    sixteen = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    rotated = solid((0, 0, 0), size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    frames = [solid((255, 0, 0), (16, 16)), solid((0, 0, 255), (16, 16))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "rgb.jpg": encode(noise(0), "JPEG"),
        "gray.png": encode(solid().convert("L"), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette_alpha.png": encode(palette_alpha, "PNG", transparency=0),
        "cmyk.jpg": encode(solid().convert("CMYK"), "JPEG"),
        "sixteen_bit.png": encode(sixteen, "PNG"),
        "exif_rotated.jpg": encode(rotated, "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
        "bitmap.bmp": encode(noise(1), "BMP"),
        "webp.webp": encode(noise(2), "WEBP"),
    }


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error_type)."""
    jpeg = encode(noise(3, (128, 128)), "JPEG")
    corrupt = bytearray(encode(noise(4), "PNG"))
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20 : idat + 60] = bytes(b ^ 0xFF for b in corrupt[idat + 20 : idat + 60])
    return {
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is not an image at all\n" * 10, "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt.png": (bytes(corrupt), "corrupt"),
        "bomb.png": (png_bomb(), "decompression_bomb"),
    }


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `mount` with `options` (root only: the test is skipped
    elsewhere), unmounted afterwards."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
