"""Stage 1: COCO images -> InceptionV3 `mixed10` float16 TFRecord shards + vocab.txt + manifest.

    python -m beam_jobs.extract_features --split train --captions_json ANN.json \
        --images_dir DIR --output_dir FEATURES_DIR [--weights inception-2015|imagenet|none|PATH] \
        [Beam flags]
    python -m beam_jobs.extract_features --karpathy_json dataset_coco.json \
        --images_dir COCO_ROOT --output_dir FEATURES_DIR

Writes FEATURES_DIR/{split}-SSSSS-of-NNNNN.tfrecord.gz (one Example per image),
errors-{split}-*.parquet (one row per image that could not be read or decoded),
vocab.txt (built from the train split) and manifest.json (counts per split).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from beam_jobs.flags import add_common_flags, parse_job_flags
from model.cli import (
    UsageError,
    add_runtime_flag,
    check_exists,
    check_writable,
    command_parser,
    int_at_least,
    non_negative_int,
    positive_int,
    run_cli,
)
from model.defaults import IMAGES_PER_SHARD, NAMED_WEIGHTS, PRECISIONS, named_weights_path
from model.images.runtimes import check_runtime


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = command_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions_json", help="COCO captions file (annotations/captions_*.json)")
    src.add_argument("--karpathy_json", help="Karpathy split file (dataset_coco.json)")
    p.add_argument("--split", help="split name for --captions_json (train, val, ...)")
    p.add_argument("--images_dir", required=True, help="image folder (COCO root for Karpathy)")
    p.add_argument("--output_dir", required=True, help="FEATURES_DIR, local or gs://")
    p.add_argument(
        "--weights",
        help="inception-2015 (real ImageNet weights offline: run `make weights` once) | "
        "imagenet (Keras downloads them) | none (random init) | a weights file "
        "(default: FEATURES_DIR's, when it has a manifest; else imagenet)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="extractor compute (default: FEATURES_DIR's, when it has a manifest; else float32)",
    )
    add_runtime_flag(p, "FEATURES_DIR's, when it has a manifest; else tensorflow")
    p.add_argument(
        "--vocab_size", type=int_at_least(5), default=5000, help="tokens incl. 4 reserved"
    )
    p.add_argument("--vocab", help="vocab.txt for non-train runs (default FEATURES_DIR/vocab.txt)")
    p.add_argument(
        "--num_shards",
        type=non_negative_int,
        default=0,
        help=f"exact shards per split; 0 streams shards of at most {IMAGES_PER_SHARD} images",
    )
    p.add_argument(
        "--model_copies",
        type=positive_int,
        default=None,
        help="share N model copies across worker processes",
    )
    p.add_argument("--large_model", action="store_true", help="one model shared per machine (GPU)")
    add_common_flags(p)
    args, beam_args = parse_job_flags(p, argv)
    if args.captions_json and not args.split:
        raise UsageError("--split is required with --captions_json")
    return args, beam_args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the job; returns a summary dict (counts, seconds, images/s)."""
    args, beam_args = parse_args(argv)
    for flag in ("--captions_json", "--karpathy_json", "--images_dir", "--vocab"):
        check_exists(flag, getattr(args, flag[2:]))
    check_writable("--output_dir", args.output_dir)
    if args.runtime:
        check_runtime(args.runtime)
    if args.weights is None:
        pass  # FEATURES_DIR's own, or imagenet: decided once its manifest is read
    elif args.weights in NAMED_WEIGHTS:
        if not os.path.exists(named_weights_path(args.weights)):
            raise UsageError(
                f"--weights {args.weights}: not converted yet; run `make weights` "
                "(python -m model.images.pretrained) first"
            )
    elif args.weights not in ("imagenet", "none"):
        check_exists("--weights", args.weights)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    from beam_jobs.extract_pipeline import run_job

    return run_job(args, beam_args)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
