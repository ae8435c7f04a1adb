"""Benchmark: InceptionV3 on each runtime and precision, bare and inside both Beam jobs.

    python -m benchmarks.runtimes [--images 256] [--batch_size 16] [--rounds 3]

The bare encoder (uint8 pixels in, `mixed10` out) on TensorFlow and on OpenVINO, in
float32, in int8 (calibrated by `model.images.calibrate` on `--calibration_images` of
the same 640x480 JPEGs) and, where the CPU has bfloat16, in bfloat16: the same random
batch through each, in alternating rounds, so a machine that slows down mid-run slows
all alike. Then `caption_images` and `extract_features` end to end on `--images` of the
JPEGs with each runtime and precision. Each rate is printed with its ratio to
TensorFlow float32 in this run and to its own bare encoder; the features' closeness to
TensorFlow float32's is the cosine per image. Several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.common import make_jpegs, tutorial_export, write_coco


def has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as OpenVINO sees it."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = (x.reshape(len(x), -1).astype(np.float32) for x in (a, b))
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def name(setup: tuple[str, str]) -> str:
    return f"{setup[0]} {setup[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="for the Beam jobs")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weights", default="none", help="the extractor's weights")
    p.add_argument("--calibration_images", type=int, default=64, help="for int8")
    a = p.parse_args()
    from model.quiet import import_tensorflow

    import_tensorflow()
    from beam_jobs.caption_images import run as caption
    from beam_jobs.extract_features import run as extract
    from model.images.calibrate import calibrate
    from model.images.runtimes import build_encoder

    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "img")
        names = make_jpegs(images, max(a.images, a.calibration_images))
        int8 = os.path.join(tmp, "int8")
        chosen = [os.path.join(images, n) for n in names[: a.calibration_images]]
        calibrate(a.weights, chosen, int8)
        setups = [("tensorflow", "float32"), ("openvino", "float32"), ("openvino", "int8")]
        if has_bfloat16():
            setups += [("tensorflow", "bfloat16"), ("openvino", "bfloat16")]
        calibration = {("openvino", "int8"): int8}
        encoders = {
            s: build_encoder(a.weights, s[1], None, s[0], calibration.get(s)) for s in setups
        }
        x = np.random.RandomState(0).randint(0, 256, (a.batch_size, 299, 299, 3)).astype(np.uint8)
        outputs = {s: encode(x) for s, encode in encoders.items()}  # warm up
        seconds = dict.fromkeys(setups, 0.0)
        for _ in range(a.rounds):
            for s, encode in encoders.items():
                start = time.perf_counter()
                encode(x)
                seconds[s] += time.perf_counter() - start
        bare = {s: a.rounds * a.batch_size / t for s, t in seconds.items()}
        base = bare[("tensorflow", "float32")]
        print(f"runtimes: bare InceptionV3, batches of {a.batch_size}, {a.rounds} rounds")
        print(f"{'runtime':<24}{'images/s':>10}{'x TF fp32':>11}{'cosine min':>12}")
        for s in setups:
            cos = cosine(outputs[s], outputs[("tensorflow", "float32")]).min()
            print(f"{name(s):<24}{bare[s]:>10.1f}{bare[s] / base:>11.2f}{cos:>12.5f}")

        export, _ = tutorial_export(os.path.join(tmp, "export"), "float32", a.weights)
        ann = os.path.join(tmp, "captions.json")
        write_coco(ann, names[: a.images])
        job_images = os.path.join(tmp, "job")
        os.makedirs(job_images)
        for n in names[: a.images]:
            os.link(os.path.join(images, n), os.path.join(job_images, n))
        jobs: dict[str, dict] = {"caption_images": {}, "extract_features": {}}
        for s in setups:
            flags = ["--runtime", s[0], "--precision", s[1], "--batch_size", str(a.batch_size)]
            flags += ["--calibration", int8] if s in calibration else []
            flags += ["--runner", "FnApiRunner", "--progress_seconds", "0"]
            out = os.path.join(tmp, "-".join(s))
            done = caption(
                ["--model", export, "--input", job_images, "--output_dir", out + "-c", *flags]
            )
            jobs["caption_images"][s] = done["images_per_second"]
            done = extract(
                ["--split", "train", "--captions_json", ann, "--images_dir", job_images]
                + ["--output_dir", out + "-f", "--weights", a.weights, *flags]
            )
            jobs["extract_features"][s] = done["images_per_second"]
        for job, rates in jobs.items():
            print(f"\nruntimes: {job} end to end, {a.images} 640x480 JPEGs (start-up included)")
            print(f"{'runtime':<24}{'images/s':>10}{'x TF fp32':>11}{'of bare':>10}")
            for s, r in rates.items():
                ratio = r / rates[("tensorflow", "float32")]
                print(f"{name(s):<24}{r:>10.1f}{ratio:>11.2f}{r / bare[s]:>10.2f}")


if __name__ == "__main__":
    main()
