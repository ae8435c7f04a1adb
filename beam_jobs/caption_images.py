"""Stage 3: bulk-captions image folders, globs, archives and tables of URLs into a
caption table (Delta Lake).

    python -m beam_jobs.caption_images --model MODEL_DIR/export \
        --input PATH_OR_GLOB_OR_ARCHIVE [--input ...] \
        [--input_table T.parquet|T.csv|T.jsonl --key_column id --keep_columns a,b] \
        --output_dir CAPTIONS_DIR [Beam flags]

CAPTIONS_DIR is a Delta table with one row per input, captioned or failed (`error_type`
and `message` say why); a table row's `key` and kept columns come with it, so captions
join back to the input table. The table changes only when a run completes, in one commit
(`beam_jobs.caption_table`); a killed run is resumed by the same command with
--skip_existing (`beam_jobs.caption_run`).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from typing import Any

from beam_jobs.flags import add_common_flags, parse_job_flags
from model.cli import (
    UsageError,
    add_decoding_flags,
    add_fetch_flags,
    add_runtime_flag,
    check_exists,
    check_writable,
    command_parser,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_cli,
)
from model.defaults import CHECKPOINT_SECONDS, COMPACT_ABOVE, PRECISIONS
from model.images.runtimes import check_runtime


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = command_parser(__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument(
        "--input", action="append", default=[], help="folder, glob or .tar/.tar.gz/.zip (repeat)"
    )
    p.add_argument(
        "--input_table",
        action="append",
        default=[],
        help="Parquet, CSV or JSON Lines file (or glob) of image uris: paths, gs://, "
        "ARCHIVE!/member, http(s):// (repeat)",
    )
    p.add_argument(
        "--uri_column", help="--input_table's column of uris (default: url, else uri, else path)"
    )
    p.add_argument(
        "--key_column", help="--input_table's column that identifies a row (default: the uri)"
    )
    p.add_argument(
        "--keep_columns", help="--input_table columns copied into the caption table: a,b,c"
    )
    p.add_argument("--output_dir", required=True, help="CAPTIONS_DIR, local or gs://")
    p.add_argument(
        "--skip_existing",
        action="store_true",
        help="skip uris already in the output; resumes this command's killed run",
    )
    p.add_argument(
        "--checkpoint_seconds",
        type=non_negative_float,
        default=CHECKPOINT_SECONDS,
        help="finished rows are saved at least this often, so a killed run resumed with "
        "--skip_existing loses at most this much work",
    )
    p.add_argument(
        "--allow_mixed_models",
        action="store_true",
        help="with --skip_existing, add rows of this model to a table of another",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, help="extractor compute (default: as trained)"
    )
    add_runtime_flag(p, "the one the model's features were extracted with")
    p.add_argument(
        "--num_shards",
        type=non_negative_int,
        default=0,
        help="exactly this many captions files, written at the end; 0 (default) writes "
        "them as rows are finished (see --checkpoint_seconds)",
    )
    p.add_argument(
        "--compact_above",
        type=non_negative_int,
        default=COMPACT_ABOVE,
        help="after its commit, compact the table when it holds more small files than "
        "this (0: never; python -m beam_jobs.caption_table compact does it by hand)",
    )
    p.add_argument(
        "--model_copies", type=positive_int, help="share N model copies across worker processes"
    )
    p.add_argument("--large_model", action="store_true", help="one model shared per machine (GPU)")
    p.add_argument("--attention_dir", help="write attention plots here")
    p.add_argument(
        "--attention_plots", type=non_negative_int, default=8, help="how many (smallest uris)"
    )
    add_fetch_flags(p)
    add_decoding_flags(p)
    add_common_flags(p)
    args, beam_args = parse_job_flags(p, argv)
    if not args.input and not args.input_table:
        raise UsageError("give the images as --input PATH and/or --input_table TABLE")
    return args, beam_args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, beam_args = parse_args(argv)
    check_exists("--model", args.model)
    for spec in args.input:
        if not re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec):  # shard patterns match later
            check_exists("--input", spec)
    for table in args.input_table:
        check_exists("--input_table", table)
    check_writable("--output_dir", args.output_dir)
    if args.runtime:
        check_runtime(args.runtime)
    check_writable("--attention_dir", args.attention_dir)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    from beam_jobs.caption_pipeline import run_job

    return run_job(args, beam_args)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
