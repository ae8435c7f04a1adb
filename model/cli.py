"""Command-line plumbing: start-up errors as one line and exit status 1, checked numeric flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from model.formats import FormatError


def run_cli(
    run: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
) -> Any:
    """Bad arguments (missing file, wrong manifest, ...) print `error: ...`, not a traceback."""
    try:
        return run(argv)
    except (FormatError, FileNotFoundError, *errors) as e:
        sys.exit(f"error: {e}")


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
