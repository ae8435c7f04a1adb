"""Benchmark: InceptionV3 on each runtime and precision, bare and inside the caption job.

    python -m benchmarks.runtimes [--images 256] [--batch_size 16] [--rounds 3]

The bare encoder (uint8 pixels in, `mixed10` out) on TensorFlow and on OpenVINO, in
float32 and, where the CPU has bfloat16, in bfloat16: the same random batch through
each, in alternating rounds, so a machine that slows down mid-run slows all alike.
Then `caption_images` end to end on the same 640x480 JPEGs with `--runtime tensorflow`
and `--runtime openvino`. Each rate is printed with its ratio to TensorFlow float32 in
this run; the features' closeness to TensorFlow float32's is the cosine per image.
A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.common import make_jpegs


def has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as OpenVINO sees it."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="for the caption job")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weights", default="none", help="the extractor's weights")
    a = p.parse_args()
    from model.quiet import import_tensorflow

    import_tensorflow()
    from model.images.runtimes import build_encoder

    setups = [("tensorflow", "float32"), ("openvino", "float32")]
    if has_bfloat16():
        setups += [("tensorflow", "bfloat16"), ("openvino", "bfloat16")]
    encoders = {s: build_encoder(a.weights, s[1], None, s[0]) for s in setups}
    x = np.random.RandomState(0).randint(0, 256, (a.batch_size, 299, 299, 3)).astype(np.uint8)
    outputs = {s: encode(x) for s, encode in encoders.items()}  # warm up
    seconds = dict.fromkeys(setups, 0.0)
    for _ in range(a.rounds):
        for s, encode in encoders.items():
            start = time.perf_counter()
            encode(x)
            seconds[s] += time.perf_counter() - start
    rate = {s: a.rounds * a.batch_size / t for s, t in seconds.items()}
    base = rate[("tensorflow", "float32")]
    print(f"runtimes: bare InceptionV3, batches of {a.batch_size}, {a.rounds} alternating rounds")
    print(f"{'runtime':<24}{'images/s':>10}{'x TF fp32':>11}{'cosine min':>12}")
    for s in setups:
        cos = cosine(outputs[s], outputs[("tensorflow", "float32")]).min()
        print(f"{s[0] + ' ' + s[1]:<24}{rate[s]:>10.1f}{rate[s] / base:>11.2f}{cos:>12.5f}")

    from beam_jobs.caption_images import run
    from model.images.extractor import features_identity
    from model.network.captioner import ShowAttendTell
    from model.network.export import save_export
    from model.text.vocab import RESERVED, Vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(os.path.join(tmp, "img"), a.images)
        vocab = Vocabulary((*RESERVED, *[f"w{i}" for i in range(5000 - len(RESERVED))]))
        model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)  # tutorial size
        export = os.path.join(tmp, "export")
        save_export(model, vocab, features_identity(a.weights), export)
        jobs = {}
        for runtime in ("tensorflow", "openvino"):
            start = time.perf_counter()
            run(
                ["--model", export, "--input", os.path.join(tmp, "img")]
                + ["--output_dir", os.path.join(tmp, runtime), "--runtime", runtime]
                + ["--batch_size", str(a.batch_size), "--runner", "FnApiRunner"]
                + ["--progress_seconds", "0"]
            )
            jobs[runtime] = a.images / (time.perf_counter() - start)
    print(f"\nruntimes: caption_images end to end, {a.images} 640x480 JPEGs (start-up included)")
    for runtime, r in jobs.items():
        bare = rate[(runtime, "float32")]
        print(
            f"{runtime:<12}{r:>8.1f} images/s  x TF {r / jobs['tensorflow']:.2f}  "
            f"of its bare encoder {r / bare:.2f}"
        )


if __name__ == "__main__":
    main()
