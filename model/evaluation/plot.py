"""Attention plots: the image with one attention overlay per generated word (PNG)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: Beam workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def attention_png(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    title: str | None = None,
    columns: int = 5,
) -> bytes:
    """`attention_figure(...)` as PNG bytes, for whichever file system the caller writes to."""
    fig = attention_figure(image, words, attention, title, columns)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def plot_attention(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    path: str,
    title: str | None = None,
    columns: int = 5,
) -> str:
    """Writes `attention_png(...)` to `path` (local or remote) and returns `path`."""
    from model.io import storage

    storage.write_bytes(path, attention_png(image, words, attention, title, columns))
    return path


def attention_figure(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    title: str | None = None,
    columns: int = 5,
) -> plt.Figure:
    """Draws `image` once per word with that step's attention map over it.

    Args:
      image: the original image (any size); the attention grid is stretched over it.
      words: the generated words (1 to max_length of them; `<end>` may be included).
      attention: (len(words) or more, L) weights, L a square number (64 = 8x8).
    """
    if not words:
        raise ValueError("plot_attention needs at least one word")
    attention = np.asarray(attention, dtype=np.float32)[: len(words)]
    side = int(round(math.sqrt(attention.shape[-1])))
    if side * side != attention.shape[-1]:
        raise ValueError(f"attention has {attention.shape[-1]} locations, not a square grid")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    height, width = pixels.shape[:2]
    columns = max(1, min(columns, len(words)))
    rows = math.ceil(len(words) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 2.6 * rows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    # Image and overlay share one extent: with imshow's default pixel-centred
    # extent beside (0, width), a 1x1 image filled a quarter of its panel.
    extent = (0, width, height, 0)
    for ax, word, weights in zip(axes.flat, words, attention, strict=False):
        ax.imshow(pixels, extent=extent)
        ax.imshow(
            weights.reshape(side, side),
            cmap="gray",
            alpha=0.6,
            extent=extent,
            interpolation="bilinear",
        )
        ax.set_title(word, fontsize=12)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
