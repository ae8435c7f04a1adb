"""Flags both Beam jobs share; parsed before Beam or TensorFlow is imported."""

from __future__ import annotations

import argparse

from model.cli import add_verbose_flag, non_negative_float, positive_int
from model.defaults import MAX_BYTES, MAX_PIXELS

PROGRESS_SECONDS = 5.0


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=32,
        help="images per model call (RunInference batch)",
    )
    parser.add_argument(
        "--decode_threads",
        type=positive_int,
        default=2,
        help="threads per worker reading and decoding images ahead of the model (8-16 for gs://)",
    )
    parser.add_argument(
        "--max_pixels",
        type=positive_int,
        default=MAX_PIXELS,
        help="images with more pixels are refused as decompression bombs",
    )
    parser.add_argument(
        "--max_bytes",
        type=positive_int,
        default=MAX_BYTES,
        help="files and archive members larger than this are refused unread (error rows)",
    )
    parser.add_argument(
        "--progress_seconds",
        type=non_negative_float,
        default=PROGRESS_SECONDS,
        help="seconds between progress lines on stderr (0: none)",
    )
    add_verbose_flag(parser)
