"""Evaluates an export on a features split: greedy captions scored with the COCO metrics.

    python -m model.evaluate --model MODEL_DIR/export --data_dir FEATURES_DIR \
        --split val [--plots 5]

Decodes every image of the split from its stored features (batched greedy),
scores corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr against all of each
image's references, prints a table next to a blind baseline (the most
frequent training caption for every image), and writes metrics.json,
predictions.json (COCO results format) and optional attention plots to
--output_dir (default MODEL_DIR/eval/<split>/).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from model.cli import (
    add_decoding_flags,
    add_verbose_flag,
    check_exists,
    check_writable,
    command_parser,
    non_negative_int,
    positive_int,
    require,
    run_cli,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR/export")
    p.add_argument("--data_dir", required=True, help="FEATURES_DIR")
    p.add_argument("--split", default="val")
    p.add_argument("--output_dir", help="default: MODEL_DIR/eval/<split>/")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--max_length", type=positive_int, help="override the export's decoding limit")
    p.add_argument(
        "--plots", type=non_negative_int, default=0, help="attention plots for the first N images"
    )
    p.add_argument("--images_dir", help="source images for plots (default: from the manifest)")
    p.add_argument("--no_java", action="store_true", help="Python tokenizer, no METEOR")
    p.add_argument(
        "--any_precision",
        action="store_true",
        help="score features of another precision, runtime or int8 calibration than the "
        "model's (same weights and preprocessing), as caption_images --precision captions",
    )
    add_decoding_flags(p)
    add_verbose_flag(p)
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    require("pycocoevalcap", "model.evaluate")
    for flag in ("--model", "--data_dir", "--images_dir"):
        check_exists(flag, getattr(args, flag[2:]))
    check_writable("--output_dir", args.output_dir)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    from model.evaluation.report import evaluate

    return evaluate(args)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
