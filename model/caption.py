"""Captions a few image files, local, remote or http(s), without Beam: one line per file.

    python -m model.caption --model MODEL_DIR/export IMAGE [IMAGE ...] [--beam_size K] [--plots DIR]

Prints `FILE<TAB>caption` per file, in the order given, each line as soon as its batch is
captioned, or `FILE<TAB>error: TYPE: message` for a file that cannot be read or decoded
(a FIFO, device or folder is refused before it is opened); the exit status is 1 if any
failed. An http(s) URL is fetched as `beam_jobs.caption_images` fetches a table's URLs
(`model.images.fetch`: retries, limits, the same error types, e.g. `http_404`).
Images go through the same preprocessing, extractor and decoder as
`beam_jobs.caption_images`, so the captions are the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from model.cli import (
    add_decoding_flags,
    add_fetch_flags,
    add_runtime_flag,
    check_exists,
    command_parser,
    decoding_settings,
    empty_captions_warning,
    first_line,
    positive_int,
    run_cli,
)
from model.defaults import MAX_BYTES, PRECISIONS
from model.images.fetch import Fetcher, FetchSettings, is_http
from model.images.runtimes import check_runtime, extractor_settings
from model.io import storage


def read_image(path: str, fetcher: Fetcher) -> bytes:
    """The bytes of a local, remote (gs://, ...) or http(s) image file; raises ImageError
    for one refused unread (not a regular file, over the fetcher's `max_bytes`, a failed
    fetch)."""
    from model.images.preprocess import ImageError

    if is_http(path):
        return fetcher.fetch(path)
    if problem := storage.not_a_readable_file(path, fetcher.settings.max_bytes):
        raise ImageError(*problem)
    return storage.read_bytes(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, local or gs://, ...")
    p.add_argument("--plots", help="write an attention plot per image into this folder")
    p.add_argument(
        "--precision", choices=PRECISIONS, help="extractor compute (default: as trained)"
    )
    add_runtime_flag(p, "the one the model's features were extracted with")
    p.add_argument("--batch_size", type=positive_int, default=16, help="images per model call")
    p.add_argument(
        "--max_bytes",
        type=positive_int,
        default=MAX_BYTES,
        help="files larger than this are refused unread (an error line)",
    )
    p.add_argument("--log_prob", action="store_true", help="also print each caption's log-prob")
    add_decoding_flags(p)
    add_fetch_flags(p)
    p.add_argument("--verbose", action="store_true", help="TensorFlow's start-up log too")
    return p.parse_args(argv)


def caption_files(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """{"path", "caption", "log_prob", ...} or {"path", "error_type", "message"} per file,
    in the order given, each as soon as it and every file before it are done."""
    import numpy as np

    from model.images.preprocess import ImageError, preprocess_image
    from model.inference.end_to_end import build_caption_fn, split_results
    from model.network.export import load_export

    export = load_export(args.model)
    precision, runtime, calibration = extractor_settings(
        args.precision, args.runtime, args.calibration, export.features
    )
    caption_batch = build_caption_fn(
        export, precision, decoding_settings(args), runtime, calibration
    )
    fetcher = Fetcher(FetchSettings.from_flags(args, args.max_bytes))
    rows: list[dict[str, Any]] = []
    ready: list[tuple[int, Any]] = []  # (row index, pixels)
    shown = 0  # rows handed out so far

    def done() -> Iterator[dict[str, Any]]:
        nonlocal shown
        while shown < len(rows) and "pending" not in rows[shown]:
            yield rows[shown]
            shown += 1

    def flush() -> None:
        if not ready:
            return
        outputs = caption_batch(np.stack([pixels for _, pixels in ready]))
        for (i, _), result in zip(ready, split_results(outputs, export.vocab), strict=True):
            rows[i].update(result=result, caption=result.caption, log_prob=result.log_prob)
            del rows[i]["pending"]
        ready.clear()

    for path in args.images:
        yield from done()
        row: dict[str, Any] = {"path": path}
        rows.append(row)
        try:
            data = read_image(path, fetcher)
            decoded = preprocess_image(data)
        except ImageError as e:
            row.update(error_type=e.kind, message=str(e))
            continue
        except FileNotFoundError:
            row.update(error_type="missing_file", message="no such file")
            continue
        except Exception as e:  # noqa: BLE001 - OSError, or tf.errors.* from an unreachable store
            row.update(error_type="read_error", message=f"{type(e).__name__}: {first_line(e)}")
            continue
        row.update(width=decoded.width, height=decoded.height, pending=True)
        if args.plots:  # plotted once printed: an http(s) image is not fetched twice
            row["data"] = data
        ready.append((len(rows) - 1, decoded.pixels))
        if len(ready) == args.batch_size:
            flush()
    flush()
    yield from done()


def write_plot(row: dict[str, Any], folder: str, index: int) -> str:
    from model.evaluation.plot import plot_attention
    from model.images.preprocess import decode_image

    image, _ = decode_image(row.pop("data"))
    image.thumbnail((320, 320))
    result = row["result"]
    words = result.caption.split() + ([] if result.hit_max_length else ["<end>"])
    name = f"{index:03d}_{os.path.splitext(os.path.basename(row['path']))[0]}.png"
    return plot_attention(
        image, words or ["<end>"], result.attention, os.path.join(folder, name), result.caption
    )


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    check_exists("--model", args.model)
    if args.runtime:
        check_runtime(args.runtime)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    if args.plots:
        storage.makedirs(args.plots)
    rows = []
    for i, row in enumerate(caption_files(args)):
        rows.append(row)
        if "caption" in row:
            extra = f"\t{row['log_prob']:.3f}" if args.log_prob else ""
            print(f"{row['path']}\t{row['caption']}{extra}", flush=True)
            if args.plots:
                row["plot"] = write_plot(row, args.plots, i)
        else:
            print(f"{row['path']}\terror: {row['error_type']}: {row['message']}", flush=True)
    captioned = [row["caption"] for row in rows if "caption" in row]
    if warning := empty_captions_warning(sum(not c for c in captioned), len(captioned)):
        print(f"caption: {warning}", file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    rows = run_cli(run, argv)
    if any("caption" not in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
