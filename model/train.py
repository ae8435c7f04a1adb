"""Stage 2: trains Show-Attend-Tell on the feature shards with tf.distribute, then exports it.

    python -m model.train --data_dir FEATURES_DIR --model_dir MODEL_DIR [--epochs N] [--preset tiny]

MirroredStrategy over the local GPUs (or the CPU), MultiWorkerMirroredStrategy
when TF_CONFIG names several workers; one custom loop (`model.training.steps`) serves
both, and N replicas update exactly as one device on the whole batch. Several
steps run per compiled call (`--steps_per_execution`). Step-level checkpoints in
MODEL_DIR/checkpoints: killing the process (or every worker) and running the
same command again continues where it stopped, with the same data order. With
`--scst_epochs N`, N self-critical epochs (CIDEr-D as the reward) follow the
cross-entropy ones (docs/train.md). The model, its vocabulary and a manifest go to
MODEL_DIR/export/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from model.cli import (
    check_exists,
    check_writable,
    command_parser,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    require,
    run_cli,
)
from model.defaults import DEFAULT_DROPOUT, DEFAULT_MAX_LENGTH, PRESETS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    p.add_argument("--data_dir", required=True, help="FEATURES_DIR written by extract_features")
    p.add_argument("--model_dir", required=True, help="checkpoints, logs and export/ go here")
    p.add_argument("--epochs", type=positive_int, default=20, help="cross-entropy epochs")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch_size", type=positive_int, help="global batch (default 64)")
    batch.add_argument(
        "--per_replica_batch_size",
        type=positive_int,
        help="pairs per replica; the global batch is this times the replica count",
    )
    p.add_argument("--preset", default="tutorial", choices=sorted(PRESETS), help="model size")
    p.add_argument("--embedding_dim", type=positive_int, help="overrides the preset")
    p.add_argument("--units", type=positive_int, help="overrides the preset")
    p.add_argument(
        "--dropout",
        type=non_negative_float,
        default=DEFAULT_DROPOUT,
        help="on the word embeddings and before the output layer (the paper used dropout)",
    )
    p.add_argument(
        "--attention_penalty", type=non_negative_float, default=1.0, help="lambda; 0 turns it off"
    )
    p.add_argument(
        "--no_feature_norm",
        action="store_true",
        help="feed raw features (no per-channel standardisation)",
    )
    p.add_argument("--learning_rate", type=positive_float, default=1e-3, help="peak rate")
    p.add_argument("--warmup_steps", type=non_negative_int, default=100)
    p.add_argument("--decay", default="cosine", choices=["cosine", "constant"])
    p.add_argument(
        "--clip_norm",
        type=non_negative_float,
        default=5.0,
        help="clip the global norm of the gradient summed over replicas (0: off)",
    )
    p.add_argument(
        "--mixed_precision",
        nargs="?",
        const="auto",
        choices=["auto", "float16", "bfloat16"],
        help="mixed precision; alone: float16 on GPU, bfloat16 on CPU",
    )
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile forward and backward")
    p.add_argument(
        "--steps_per_execution",
        type=positive_int,
        default=10,
        help="training steps per compiled call; the host syncs, logs and checks only between",
    )
    p.add_argument(
        "--checkpoint_every", type=positive_int, default=200, help="steps between checkpoints"
    )
    p.add_argument(
        "--select_by",
        default="cider",
        choices=["cider", "loss"],
        help="the exported epoch is the best on the val split by greedy CIDEr-D (default) "
        "or by loss",
    )
    p.add_argument(
        "--patience",
        type=non_negative_int,
        default=3,
        help="stop after this many epochs without a better --select_by score (0: off)",
    )
    scst = p.add_argument_group(
        "self-critical training (Rennie et al. 2017): after the cross-entropy epochs, "
        "sample captions and raise those whose CIDEr-D beats a baseline"
    )
    scst.add_argument(
        "--scst_epochs",
        type=non_negative_int,
        default=0,
        help="self-critical epochs after --epochs of cross-entropy (0: none); a larger "
        "value on the same MODEL_DIR continues",
    )
    scst.add_argument(
        "--scst_samples", type=positive_int, default=5, help="captions sampled per image (K)"
    )
    scst.add_argument(
        "--scst_baseline",
        default="mean",
        choices=["mean", "greedy"],
        help="each sample's baseline: the mean reward of the image's other samples, or the "
        "reward of its greedy caption",
    )
    scst.add_argument(
        "--scst_learning_rate",
        type=positive_float,
        default=2e-5,
        help="constant Adam rate (ruotianluo's 5e-5 suits COCO; on Flickr8k it over-fits "
        "within an epoch)",
    )
    scst.add_argument(
        "--scst_max_length",
        type=positive_int,
        help="longest sampled caption (default: --max_length)",
    )
    scst.add_argument(
        "--scst_dropout",
        default="off",
        choices=["on", "off"],
        help="on: sample with the model's dropout and score each sample under the same masks "
        "(as ruotianluo's code samples and scores in train mode); off: neither, which "
        "measured better on Flickr8k's held-out photos (docs/quality.md)",
    )
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default="val", help="validation split, if present")
    p.add_argument(
        "--max_tokens", type=int_at_least(3), default=40, help="truncate training captions"
    )
    p.add_argument(
        "--max_length", type=positive_int, default=DEFAULT_MAX_LENGTH, help="decoding limit"
    )
    p.add_argument("--shuffle_buffer", type=positive_int, default=2048, help="pairs shuffled")
    p.add_argument(
        "--shard_policy",
        default="auto",
        choices=["auto", "file", "data"],
        help="how hosts split the data: whole shard files (auto: with >= 4 per host) or "
        "slices of every global batch",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no_serving_export",
        action="store_true",
        help="skip MODEL_DIR/export/serving (the SavedModel for TF Serving; python -m "
        "model.serving builds it later)",
    )
    p.add_argument(
        "--verbose",
        type=int,
        default=None,
        choices=[0, 1, 2, 3],
        help="0 quiet, 1 progress bar, 2 line per epoch (default: 1 on a terminal, else 2), "
        "3 lines and TensorFlow's own start-up log",
    )
    args = p.parse_args(argv)
    if args.scst_epochs and args.scst_baseline == "mean" and args.scst_samples < 2:
        p.error("--scst_baseline mean compares each sample with the others: --scst_samples >= 2")
    if args.scst_epochs and args.select_by != "cider":
        p.error("self-critical training optimises CIDEr-D: use --select_by cider with it")
    if args.scst_epochs and args.mixed_precision == "float16":
        p.error("self-critical training has no loss scaling: use bfloat16 or float32")
    args.scst_max_length = args.scst_max_length or args.max_length
    if args.verbose is None:  # a progress bar only where \r redraws it; logs get lines
        args.verbose = 1 if sys.stdout.isatty() else 2
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    require("tensorboard", "model.train")  # tf.summary writes through it
    check_exists("--data_dir", args.data_dir)
    check_writable("--model_dir", args.model_dir)
    from model.quiet import import_tensorflow

    import_tensorflow(verbose=args.verbose == 3)
    from model.training.loop import train

    return train(args)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
