"""Runs an entry point's `run(argv)`, turning start-up errors into one line and exit status 1."""

from __future__ import annotations

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
