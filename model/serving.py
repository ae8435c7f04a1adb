"""A SavedModel that TF Serving and Vertex AI can host: image bytes in, captions out.

    python -m model.serving --model MODEL_DIR/export [--output DIR] [--beam_size K]

`serving_default` takes `images`, a `tf.string` tensor of shape [None] holding
encoded image files (JPEG, PNG, GIF (first frame), BMP, WebP), and returns
`caption` (tf.string [None]), `error` ("" or the error type of an image that could
not be captioned, whose other outputs are then empty or zero: too_large,
decompression_bomb, unsupported_format (TIFF, which the graph cannot decode), empty,
truncated, corrupt, not_an_image),
`log_prob` (the sequence log-probability), `token_ids` (int32 [None, max_length],
`<end>` then `<pad>`), `length`, `hit_max_length`, `attention` ([None, max_length,
64]), and the decoded image's `width` and `height`. Decoding, alpha compositing, the JPEG DCT
shortcut, resizing, InceptionV3 and the decoding loop all run in the graph, so
`tf.saved_model.load(DIR)` needs no code of this project. The graph reads each
image's size from its header before allocating its pixels: `--max_pixels` and
`--max_bytes` bound the memory a request can take, as in the Beam jobs.

The graph reproduces `model.images.preprocess` with TensorFlow ops: JPEGs are decoded
at the same reduced DCT scale as PIL's draft mode, transparency is composited
on white, and the 299x299 bilinear resize is antialiased as PIL's is. It does
not apply EXIF orientation (TensorFlow cannot read it), so a photo a camera
stored sideways is captioned sideways; see docs/serving.md for how often the served
captions differ from `caption_images`'.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from model.cli import (
    add_decoding_flags,
    check_exists,
    command_parser,
    decoding_settings,
    positive_int,
    run_cli,
)
from model.defaults import MAX_BYTES, MAX_PIXELS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument("--output", help="default: MODEL_DIR/export/serving")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"))
    add_decoding_flags(p)
    p.add_argument(
        "--max_pixels",
        type=positive_int,
        default=MAX_PIXELS,
        help="larger images (from the file header, before decoding) get error decompression_bomb",
    )
    p.add_argument(
        "--max_bytes", type=positive_int, default=MAX_BYTES, help="larger files get error too_large"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an image that cannot be captioned fails the whole request (default: its error "
        "output says why and its caption is empty)",
    )
    p.add_argument("--verbose", action="store_true", help="TensorFlow's start-up log too")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    check_exists("--model", args.model)
    from model.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    from model.inference.saved_model import write_serving_export

    limits = {"max_pixels": args.max_pixels, "max_bytes": args.max_bytes, "strict": args.strict}
    path = write_serving_export(
        args.model, args.output, args.precision, decoding_settings(args), limits
    )
    print(f"serving: wrote {path} (serving_default: images -> caption, error, log_prob, ...)")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
