"""Shared benchmark helpers: generated images, the bare-model bound, job rates, peak memory,
and where a job's CPU time goes (`Rate`, `report`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def job_jpegs(folder: str, count: int, photos: str | None) -> list[str]:
    """`count` JPEGs in `folder`, named img_000000.jpg, ...: generated (`make_jpegs`), or
    the first of `photos` (a folder of your own JPEGs, linked, not copied)."""
    if photos is None:
        return make_jpegs(folder, count)
    found = sorted(n for n in os.listdir(photos) if n.lower().endswith((".jpg", ".jpeg")))[:count]
    if len(found) < count:
        sys.exit(f"--photos {photos}: {len(found)} JPEGs, the benchmark needs {count}")
    os.makedirs(folder, exist_ok=True)
    names = [f"img_{i:06d}.jpg" for i in range(count)]
    for name, photo in zip(names, found, strict=True):
        os.symlink(os.path.abspath(os.path.join(photos, photo)), os.path.join(folder, name))
    return names


def tutorial_export(path: str, precision: str, weights: str = "none") -> tuple[str, object]:
    """An export of a tutorial-size model (embedding 256, units 512, vocabulary 5000) on
    `weights` (random-init InceptionV3 by default): the size whose cost the job benchmarks
    measure. Returns (path, model)."""
    from model.images.extractor import features_identity
    from model.network.captioner import ShowAttendTell
    from model.network.export import save_export
    from model.text.vocab import RESERVED, Vocabulary

    vocab = Vocabulary((*RESERVED, *[f"w{i}" for i in range(5000 - len(RESERVED))]))
    model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
    save_export(model, vocab, features_identity(weights, precision), path)
    return path, model


def write_coco(path: str, names: list[str]) -> None:
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    anns = [
        {"id": i + 1, "image_id": i + 1, "caption": "a photo of something"}
        for i in range(len(names))
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)


def cpu_seconds() -> float:
    """CPU time of this process over all its threads (the jobs run in it: FnApiRunner)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Rate:
    """A step's speed: images/s, and CPU milliseconds an image over every core it used."""

    per_second: float
    cpu_ms: float


def timed(call: Callable[[], object], images: int, repeats: int) -> Rate:
    """`call` (over `images` images) run `repeats` times after one warm-up call."""
    call()
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        call()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return Rate(repeats * images / seconds, 1e3 * cpu / (repeats * images))


def bare_inception_rate(
    batch_size: int,
    precision: str,
    batches: int = 6,
    runtime: str = "tensorflow",
    calibration: str | None = None,
    weights: str = "none",
    variant: str | None = None,
) -> Rate:
    """The extractor alone on preprocessed inputs (the bound for both Beam jobs), on
    `runtime` (`model.images.runtimes.build_encoder`)."""
    from model.images.runtimes import build_encoder

    encode = build_encoder(weights, precision, variant, runtime, calibration)
    x = np.random.RandomState(0).randint(0, 256, (batch_size, 299, 299, 3)).astype(np.uint8)
    return timed(lambda: encode(x), batch_size, batches)


def decoding_cpu_ms(jpegs: list[str]) -> float:
    """CPU milliseconds an image of reading and preprocessing (JPEG decoding, resizing to
    299x299: `model.images.preprocess`), on this thread alone."""
    from model.images.preprocess import preprocess_image

    files = [Path(path).read_bytes() for path in jpegs]
    start = time.thread_time()
    for data in files:
        preprocess_image(data)
    return 1e3 * (time.thread_time() - start) / len(files)


def encoder_flags(
    a: argparse.Namespace,
    tmp: str,
    jpegs: list[str],
    weights: str = "none",
    variant: str | None = None,
) -> list[str]:
    """The job flags of --runtime and --precision; for int8, an encoder of `weights`
    calibrated on 64 of the benchmark's JPEGs first (`a.calibration` is set to it)."""
    flags = ["--runtime", a.runtime, "--precision", a.precision]
    a.calibration = None
    if a.precision == "int8":
        from model.images.calibrate import calibrate

        a.calibration = os.path.join(tmp, "int8")
        calibrate(weights, jpegs[:64], a.calibration, variant)
        flags += ["--calibration", a.calibration]
    return flags


PEAK_CODE = """
import importlib, json, resource, sys
summary = importlib.import_module(sys.argv[1]).run(json.loads(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # this process's own peak: ru_maxrss also counts the parent it was forked from
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    pass
print("PEAK", peak)
print("SUMMARY", json.dumps(summary))
"""


def peak_rss_mb(module: str, argv: list[str]) -> tuple[float, dict]:
    """Runs `module.run(argv)` in a fresh process; returns its peak resident memory (MB)
    and what `run` returned."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CODE, module, json.dumps(argv)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()
    peak = [x for x in lines if x.startswith("PEAK")][-1]
    summary = [x for x in lines if x.startswith("SUMMARY")][-1]
    return int(peak.split()[1]) / 1024, json.loads(summary.split(" ", 1)[1])


def job_bench_args(doc: str | None, model_flag: bool = False) -> argparse.Namespace:
    """The flags both Beam-job benchmarks take (and the caption job's --model)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="float32", help="float32, bfloat16, float16, int8")
    p.add_argument("--runtime", default="tensorflow", help="tensorflow or openvino (int8)")
    p.add_argument(
        "--memory_images", type=int, default=40, help="N for the N vs 10N memory check (0: skip)"
    )
    p.add_argument(
        "--photos",
        help="a folder of your own JPEGs to run on (the first --images of them, and 10x "
        "--memory_images); default: generated 640x480 JPEGs",
    )
    if model_flag:
        p.add_argument("--model", help="MODEL_DIR/export of a trained model (default: untrained)")
    args = p.parse_args()
    from model.quiet import import_tensorflow

    import_tensorflow()  # without its start-up chatter
    return args


@dataclass(frozen=True)
class JobRates:
    """A job timed at a small and a large image count in the same process."""

    images: int
    seconds: float
    startup_seconds: float  # the fixed part: model build, tracing, pipeline start
    steady: float  # images/s once running: the extra images over the extra seconds
    steady_cpu_ms: float  # CPU ms an image once running, every thread of the process

    @property
    def end_to_end(self) -> float:
        return self.images / self.seconds

    @property
    def cores(self) -> float:
        """Cores busy on average once running."""
        return self.steady * self.steady_cpu_ms / 1e3


def job_rates(run_seconds: Callable[[int], float], images: int) -> JobRates:
    """Times the job at images/8 and at images; separates start-up from per-image cost,
    in seconds and in CPU time."""
    small = max(1, images // 8)
    cpu = [cpu_seconds()]
    t_small = run_seconds(small)
    cpu.append(cpu_seconds())
    t_large = run_seconds(images)
    cpu.append(cpu_seconds())
    if t_large <= t_small:  # too few images for the per-image cost to show over noise
        return JobRates(images, t_large, float("nan"), float("nan"), float("nan"))
    steady = (images - small) / (t_large - t_small)
    cpu_ms = 1e3 * ((cpu[2] - cpu[1]) - (cpu[1] - cpu[0])) / (images - small)
    return JobRates(images, t_large, max(0.0, t_large - images / steady), steady, cpu_ms)


def report(
    name: str,
    rates: JobRates,
    bare: Rate,
    target: float,
    detail: str,
    parts: dict[str, float],
) -> None:
    """Prints the job's rates next to the bare model's, with their ratios, then where the
    job's CPU time goes: the bare encoder's and each of `parts` (CPU ms an image, measured
    alone in this run), the rest being the job's own (Beam, reading, writing). The
    encoder's share of the whole is the ratio a job that kept every core busy would reach."""
    if math.isnan(rates.steady):
        print(f"{name}: too few --images to separate start-up from per-image cost", flush=True)
    print(
        f"{name}: bare InceptionV3 {bare.per_second:.2f} images/s ({detail})\n"
        f"{name}: job steady state {rates.steady:.2f} images/s, "
        f"ratio {rates.steady / bare.per_second:.2f} (target >= {target:.2f}); "
        f"start-up {rates.startup_seconds:.1f}s\n"
        f"{name}: job end to end {rates.end_to_end:.2f} images/s over {rates.images} images "
        f"in {rates.seconds:.1f}s, ratio {rates.end_to_end / bare.per_second:.2f}",
        flush=True,
    )
    spent = {"encoder": bare.cpu_ms, **parts}
    rest = rates.steady_cpu_ms - sum(spent.values())
    listed = ", ".join(f"{k} {v:.2f}" for k, v in {**spent, "the rest": rest}.items())
    print(
        f"{name}: CPU an image at steady state {rates.steady_cpu_ms:.2f} ms on "
        f"{rates.cores:.2f} of {os.cpu_count()} cores: {listed}\n"
        f"{name}: the encoder's share of the CPU {bare.cpu_ms / rates.steady_cpu_ms:.2f} "
        f"(the ratio with every core busy)",
        flush=True,
    )


def report_memory(name: str, module: str, argv_for: Callable[[int], list[str]], n: int) -> None:
    """Peak memory of the job at n and 10n images, each in a fresh process (target: flat)."""
    peaks = [peak_rss_mb(module, argv_for(k))[0] for k in (n, 10 * n)]
    print(
        f"{name}: peak memory {peaks[0]:.0f} MB at {n} images, {peaks[1]:.0f} MB at {10 * n} "
        f"(ratio {peaks[1] / peaks[0]:.2f}, target ~1)",
        flush=True,
    )
