"""Flags both Beam jobs share; parsed before Beam or TensorFlow is imported."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from model.cli import UsageError, add_verbose_flag, non_negative_float, positive_int
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


def parse_job_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """The job's own flags, and the rest for Beam's PipelineOptions: a flag that neither
    the job nor any registered PipelineOptions knows is refused in one line, with the
    nearest known flag (Beam itself would only log it and go on)."""
    args, rest = parser.parse_known_args(argv)
    if not rest:
        return args, []  # Beam's options are not imported: a wrong flag answers at once
    beam = beam_parser()
    _, unknown = beam.parse_known_args(rest)
    if unknown:
        bad = unknown[0]
        if not bad.startswith("-"):
            raise UsageError(f"unexpected argument {bad!r} (every argument is a --flag VALUE)")
        name = bad.split("=", 1)[0]
        known = option_strings(parser) + option_strings(beam)
        near = difflib.get_close_matches(name.replace("-", "_").replace("__", "--", 1), known, 1)
        near = near or difflib.get_close_matches(name, known, 1)
        hint = f": did you mean {near[0]}?" if near else " (see --help)"
        raise UsageError(f"unknown flag {name}{hint}")
    return args, list(rest)


def beam_parser() -> argparse.ArgumentParser:
    """A parser of every flag the registered PipelineOptions classes know, as Beam builds it."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - how Beam itself collects them
    return parser


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
