"""Command-line plumbing: start-up errors as one line and exit status 1, checked flags.

Nothing here imports TensorFlow, Beam or numpy, so that a command can parse and
check its arguments and answer a mistake at once; each command imports its
heavy half only after that.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from model.io.storage import is_remote


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line: TensorFlow's and Keras's run long."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class UsageError(ValueError):
    """A bad argument found at start; printed as one line by `run_cli`."""


def run_cli(
    run: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
) -> Any:
    """Bad arguments (missing file, wrong manifest, ...) print `error: ...`, not a traceback.

    Unless the command has --verbose, TensorFlow's informational lines that C++ code
    prints while the command runs (model.quiet.WORKER_NOISE) are dropped from stderr."""
    from model.quiet import filtered_stream

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with contextlib.nullcontext() if wants_everything(args) else filtered_stream():
            return run(argv)
    except Exception as e:
        from model.io.formats import FormatError  # here, not at the top: see the module doc

        if isinstance(e, (UsageError, FormatError, FileNotFoundError, *errors)):
            sys.exit(f"error: {e}")
        raise


def wants_everything(args: Sequence[str]) -> bool:
    """--verbose (or model.train's --verbose 3): TensorFlow's own lines are shown too."""
    for i, arg in enumerate(args):
        if arg == "--verbose":
            level = args[i + 1] if i + 1 < len(args) else ""
            return level not in ("0", "1", "2")
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1] not in ("0", "1", "2")
    return False


def require(module: str, command: str) -> None:
    """A package of an extra that is not installed fails at start with the install line."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f"{command} needs {module}, which is in the train extra: "
            "pip install 'show-attend-tell[train]' (or pip install -e '.[train]')"
        )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, when it has one worth saying (not None or
    False) and the help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def command_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a command: its docstring's first line, defaults in --help."""
    return argparse.ArgumentParser(
        description=(doc or "").splitlines()[0], formatter_class=DefaultsHelpFormatter
    )


def add_runtime_flag(p: argparse.ArgumentParser, default: str) -> None:
    """--runtime: where InceptionV3 runs (model.images.runtimes), and --calibration: the
    int8 encoder of --precision int8 (model.images.calibrate)."""
    from model.defaults import RUNTIMES

    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="where InceptionV3 runs: tensorflow, or openvino (about 2x faster on CPUs; "
        f"pip install 'show-attend-tell[openvino]') (default: {default})",
    )
    p.add_argument(
        "--calibration",
        help="with --runtime openvino --precision int8: the folder of an int8 encoder made "
        "by python -m model.images.calibrate (default: the one the features were made with)",
    )


def check_exists(flag: str, path: str | None) -> None:
    """A local path (or glob) that does not exist fails at once, before the heavy
    imports; remote paths are checked later through the file system layer."""
    if path is None or is_remote(path):
        return
    if glob.has_magic(path) and not os.path.exists(path):
        if not glob.glob(path):
            raise UsageError(f"{flag} matches nothing: {path}")
    elif not os.path.exists(path):
        raise UsageError(f"{flag} does not exist: {path}")


def empty_captions_warning(empty: int, total: int) -> str | None:
    """One line when at least half the captions are empty: an untrained model, or one fed
    other features than it was trained on, says nothing, and empty captions score zero
    without a word otherwise."""
    if not total or empty * 2 < total:
        return None
    return (
        f"warning: {empty} of {total} captions are empty: the model says nothing for most "
        "images (trained too briefly, or on other features?); its export's manifest.json "
        "has its training history"
    )


def check_writable(flag: str, path: str | None) -> None:
    """A local output folder that cannot be written (a read-only disk or mount, no
    permission, a file in its place) fails at once in one line, before any work is done.
    Nothing is written to find out: the folder, or the nearest folder above it that
    exists, is asked. Object stores are checked by their first write."""
    if path is None or is_remote(path):
        return
    here = os.path.abspath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise UsageError(f"{flag} {path} cannot be written: {here} is a file")
    if os.statvfs(here).f_flag & os.ST_RDONLY:
        raise UsageError(f"{flag} {path} cannot be written: Read-only file system")
    if not os.access(here, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: Permission denied ({here})")


def _number(text: str, kind: type, minimum: float, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum:  # value != value: NaN
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a bad count fails at start with one line, not later on a worker."""
    return int(_number(text, int, 1, "a positive integer"))


def non_negative_int(text: str) -> int:
    return int(_number(text, int, 0, "an integer >= 0"))


def non_negative_float(text: str) -> float:
    return float(_number(text, float, 0.0, "a number >= 0"))


def positive_float(text: str) -> float:
    value = float(_number(text, float, 0.0, "a number > 0"))
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type factory: an integer of at least `minimum`."""

    def check(text: str) -> int:
        return int(_number(text, int, minimum, f"an integer >= {minimum}"))

    return check


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show TensorFlow's start-up log and info-level messages",
    )


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """--beam_size, --length_penalty, --allow_unk, --block_repeats (model.evaluate,
    model.caption, model.serving, beam_jobs.caption_images)."""
    from model.defaults import DEFAULT_BLOCK_REPEATS

    parser.add_argument(
        "--beam_size", type=positive_int, default=1, help="1: greedy decoding; K: beam search"
    )
    parser.add_argument(
        "--length_penalty",
        type=non_negative_float,
        default=0.0,
        help="beam search ranks captions by log-prob / ((5 + length) / 6) ** this (GNMT alpha)",
    )
    parser.add_argument(
        "--allow_unk", action="store_true", help="captions may contain <unk> (greedy and beam)"
    )
    parser.add_argument(
        "--block_repeats",
        type=non_negative_int,
        default=DEFAULT_BLOCK_REPEATS,
        metavar="N",
        help="never repeat an n-gram of this size within a caption (0: off)",
    )


def add_fetch_flags(p: argparse.ArgumentParser) -> None:
    """--fetch_timeout, --fetch_retries, --max_redirects, --per_host: how http(s) inputs
    are fetched (`model.images.fetch`; beam_jobs.caption_images and model.caption)."""
    from model.defaults import FETCH_RETRIES, FETCH_TIMEOUT, MAX_REDIRECTS, PER_HOST

    p.add_argument(
        "--fetch_timeout",
        type=positive_float,
        default=FETCH_TIMEOUT,
        help="seconds one attempt at an http(s) input may take, connect to last byte",
    )
    p.add_argument(
        "--fetch_retries",
        type=non_negative_int,
        default=FETCH_RETRIES,
        help="attempts after the first on 429, 5xx, timeouts and broken connections",
    )
    p.add_argument(
        "--max_redirects",
        type=non_negative_int,
        default=MAX_REDIRECTS,
        help="redirects an http(s) input may take",
    )
    p.add_argument(
        "--per_host",
        type=positive_int,
        default=PER_HOST,
        help="http(s) requests in flight to one host, per worker process",
    )


def decoding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags as keyword arguments of `model.decoding.decoders.make_decoder`."""
    return {
        "beam_size": args.beam_size,
        "length_penalty": args.length_penalty,
        "allow_unk": args.allow_unk,
        "block_repeats": args.block_repeats,
    }
