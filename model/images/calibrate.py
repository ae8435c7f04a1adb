"""Calibrates an int8 InceptionV3 encoder on your own photos (OpenVINO + NNCF).

    python -m model.images.calibrate --weights inception-2015 --images 'train2014/*.jpg' \
        --output int8-encoder/ [--count 300]

Post-training quantization (NNCF, mixed preset) of the OpenVINO encoder
(`model.images.runtimes`) with `--count` of the photos, drawn by a seeded hash of their
names so the same folder gives the same set. `--output` (local or gs://) then holds
`encoder.xml`, `encoder.bin` and `calibration.json` (its id: a hash of the weights, the
photos' bytes, the count and the library versions); pass it as `--calibration` with
`--runtime openvino --precision int8` to extract_features, caption_images and
model.caption. Features and exports record the calibration id: int8 features of one
calibration are not mixed with another's.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Sequence
from typing import Any

from model.cli import UsageError, command_parser, positive_int, run_cli
from model.io.formats import CALIBRATION_FILE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def pick_images(paths: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """`count` of `paths`, chosen by a seeded hash of each name (stable as the set grows)."""

    def rank(path: str) -> str:
        return hashlib.sha256(f"{seed}:{posixpath.basename(path)}".encode()).hexdigest()

    return sorted(sorted(paths, key=rank)[:count])


def list_images(spec: str) -> list[str]:
    """A folder's image files (recursively), or a glob's, local or gs://."""
    from model.io import storage

    gfile = storage.gfile()
    if gfile.isdir(spec):
        found = [
            posixpath.join(root, name) for root, _, names in gfile.walk(spec) for name in names
        ]
    else:
        found = gfile.glob(spec)
    return sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))


def calibration_pixels(paths: Sequence[str]) -> tuple[list[Any], str]:
    """The photos as the encoder's input (uint8 (1, 299, 299, 3) each) and a hash of
    their bytes; photos that do not decode are left out."""
    import numpy as np

    from model.images.preprocess import ImageError, preprocess_image
    from model.io import storage

    pixels, digest = [], hashlib.sha256()
    for path in paths:
        data = storage.read_bytes(path)
        try:
            image = preprocess_image(data)
        except ImageError:
            continue
        digest.update(hashlib.sha256(data).digest())
        pixels.append(np.asarray(image.pixels, np.uint8)[None])
    return pixels, digest.hexdigest()


def calibrate(
    weights: str, images: Sequence[str], output: str, variant: str | None = None
) -> dict[str, Any]:
    """Quantizes the encoder with `images` (paths) and writes it to `output`; returns
    the calibration record (`calibration.json`)."""
    import nncf
    import openvino as ov

    from model.images.extractor import weights_hash, weights_variant
    from model.images.runtimes import converted_encoder
    from model.io import storage

    pixels, images_hash = calibration_pixels(images)
    if not pixels:
        raise UsageError("--images: none of the photos decodes")
    network = ov.Core().read_model(converted_encoder(weights, variant))
    quantized = nncf.quantize(
        network,
        nncf.Dataset(pixels),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(pixels),
    )
    record = {
        "weights": weights,
        "weights_hash": weights_hash(weights),
        "variant": weights_variant(weights, variant),
        "images": len(pixels),
        "images_hash": images_hash,
        "preset": "mixed",
        "openvino": ov.__version__,
        "nncf": nncf.__version__,
    }
    record["id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(quantized, os.path.join(tmp, "encoder.xml"), compress_to_fp16=False)
        storage.makedirs(output)
        for name in ("encoder.xml", "encoder.bin"):
            storage.copy_from_local(os.path.join(tmp, name), posixpath.join(output, name))
    storage.write_text(posixpath.join(output, CALIBRATION_FILE), json.dumps(record, indent=1))
    return record


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = command_parser(__doc__)
    p.add_argument("--weights", default="imagenet", help="the extractor weights, as in every stage")
    p.add_argument("--images", required=True, help="folder or glob of your photos (local or gs://)")
    p.add_argument("--output", required=True, help="folder for the int8 encoder (local or gs://)")
    p.add_argument("--count", type=positive_int, default=300, help="photos to calibrate on")
    p.add_argument("--seed", type=int, default=0, help="which photos (a hash of names with it)")
    args = p.parse_args(argv)
    from model.images.extractor import check_weights
    from model.images.runtimes import check_runtime
    from model.quiet import import_tensorflow

    check_runtime("openvino")
    weights = check_weights(args.weights)
    import_tensorflow()
    found = list_images(args.images)
    if not found:
        raise UsageError(f"--images matches no image files: {args.images}")
    chosen = pick_images(found, args.count, args.seed)
    print(f"calibrate: {len(chosen)} of {len(found)} photos -> {args.output}", flush=True)
    record = calibrate(weights, chosen, args.output)
    print(
        f"calibrate: int8 encoder {record['id']} on {record['images']} photos; use it with "
        f"--runtime openvino --precision int8 --calibration {args.output}",
        flush=True,
    )
    return record


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
