"""Shared benchmark helpers: generated images, the bare-model bound, peak memory of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def make_jpegs(
    folder: str, count: int, size: tuple[int, int] = (640, 480), seed: int = 0
) -> list[str]:
    """COCO-like 640x480 JPEGs: smooth noise, so they compress like photos."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = []
    for i in range(count):
        small = rng.randint(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        name = f"img_{i:06d}.jpg"
        img.save(os.path.join(folder, name), "JPEG", quality=90)
        names.append(name)
    return names


def write_coco(path: str, names: list[str]) -> None:
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    anns = [
        {"id": i + 1, "image_id": i + 1, "caption": "a photo of something"}
        for i in range(len(names))
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)


def bare_inception_rate(batch_size: int, precision: str, batches: int = 6) -> float:
    """Images/s of the extractor alone on preprocessed inputs (the bound for both Beam jobs)."""
    import tensorflow as tf

    from model.extractor import build_feature_extractor

    extractor = build_feature_extractor("none", precision)
    fn = tf.function(lambda x: extractor(x, training=False))
    x = tf.random.uniform((batch_size, 299, 299, 3), 0, 256, dtype=tf.int32)
    x = tf.cast(x, tf.uint8)
    fn(x).numpy()  # trace and warm up
    start = time.perf_counter()
    for _ in range(batches):
        fn(x).numpy()
    return batches * batch_size / (time.perf_counter() - start)


def peak_rss_mb(module: str, argv: list[str]) -> float:
    """Runs `module.run(argv)` in a fresh process; returns its peak resident memory (MB)."""
    code = (
        "import resource, sys, importlib;"
        f"importlib.import_module({module!r}).run({argv!r});"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK")][-1]
    return int(line.split()[1]) / 1024
