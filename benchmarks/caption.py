"""Benchmark: bulk-captioning job images/s vs the bare InceptionV3 forward pass.

    python -m benchmarks.caption [--images 1024] [--batch_size 32] [--runtime openvino]
        [--precision int8] [--photos FOLDER --model MODEL_DIR/export]

Captions 640x480 JPEGs with a tutorial-size model (embedding 256, units 512,
vocabulary 5000) at images/8 and at images, or your own JPEGs (`--photos`) with your
own trained model (`--model`, whose captions end as a real model's do: the decoder's
cost is then what yours costs, measured on features of the first batch of photos),
and prints, next to the bare
encoder's rate at the same batch and precision: the steady-state rate (target
>= 0.80 of bare; greedy decoding is part of the job's cost), the fixed
start-up and the end-to-end rate; then beam 3 against greedy, for the decoder
alone and for the whole job at images/4 (start-up included, best of two
interleaved runs each); then peak memory at N and 100N inputs (40 and 4,000 by
default; target: flat): a tenth are JPEGs in a folder, the rest are members of
a .tar.gz and a .zip (128 KB of noise each, plus at 100N two 48 MB members of
zeros), read, refused as not images and written as error rows; batch 4, which
both sizes fill. A few minutes on 2 cores.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

from benchmarks.common import (
    Rate,
    bare_inception_rate,
    decoding_cpu_ms,
    encoder_flags,
    job_bench_args,
    job_jpegs,
    job_rates,
    peak_rss_mb,
    report,
    timed,
    tutorial_export,
)


def main() -> None:
    a = job_bench_args(__doc__, model_flag=True)
    from beam_jobs.caption_images import run

    with tempfile.TemporaryDirectory() as tmp:
        count = max(a.images, 10 * a.memory_images)
        names = job_jpegs(os.path.join(tmp, "img"), count, a.photos)
        jpegs = [os.path.join(tmp, "img", n) for n in names]
        if a.model:
            from model.network.export import load_export

            export, loaded = a.model, load_export(a.model)
            model = loaded.model
            weights, variant = loaded.extractor_weights(), loaded.extractor_variant
        else:
            export, model = tutorial_export(os.path.join(tmp, "export"), a.precision)
            weights, variant = "none", None
        encoder = encoder_flags(a, tmp, jpegs, weights, variant)
        features = photo_features(jpegs[: a.batch_size], weights, variant) if a.model else None

        def job_argv(inputs: list[str], out: str, *extra: str) -> list[str]:
            return [
                *("--model", export, "--output_dir", os.path.join(tmp, out)),
                *[flag for folder in inputs for flag in ("--input", folder)],
                *("--batch_size", str(a.batch_size), *encoder),
                *("--runner", "FnApiRunner", "--progress_seconds", "0", *extra),
            ]

        def argv_for(n: int, *extra: str) -> list[str]:
            folder = os.path.join(tmp, f"in{n}")
            if not os.path.isdir(folder):
                os.makedirs(folder)
                for name in names[:n]:  # a link to a --photos link stays on this disk
                    src = os.path.join(tmp, "img", name)
                    os.link(src, os.path.join(folder, name), follow_symlinks=False)
            return job_argv([folder], f"out{n}", *extra)

        bare = bare_inception_rate(
            a.batch_size, a.precision, 6, a.runtime, a.calibration, weights, variant
        )
        rates = job_rates(lambda n: run(argv_for(n))["seconds"], a.images)
        parts = {
            "JPEG decoding": decoding_cpu_ms(jpegs[:64]),
            "greedy decoder": decoder_rate(model, a.batch_size, 1, features=features).cpu_ms,
        }
        detail = f"batch {a.batch_size}, {a.runtime} {a.precision}"
        report("caption", rates, bare, 0.80, detail, parts)
        job_seconds = lambda n, *x: run(argv_for(n, *x))["seconds"]  # noqa: E731
        beam_report(model, a.batch_size, job_seconds, a.images, features)
        if a.memory_images:
            peaks = []
            for n in (a.memory_images, 100 * a.memory_images):
                inputs = memory_inputs(os.path.join(tmp, f"mem{n}"), n, os.path.join(tmp, "img"))
                argv = job_argv(inputs, f"memout{n}", "--batch_size", "4")
                peak, summary = peak_rss_mb("beam_jobs.caption_images", argv)
                rows = summary["captioned"] + summary["failed"]
                assert rows == n, f"{n} inputs gave {rows} rows"
                peaks.append((n, peak, summary["bytes_read"]))
            (n0, p0, b0), (n1, p1, b1) = peaks
            print(
                f"caption: peak memory {p0:.0f} MB at {n0} inputs ({b0 / 1e6:.0f} MB read), "
                f"{p1:.0f} MB at {n1} inputs with archives ({b1 / 1e6:.0f} MB read): "
                f"ratio {p1 / p0:.2f}, target ~1",
                flush=True,
            )


def memory_inputs(folder: str, n: int, jpegs: str) -> list[str]:
    """n inputs: n/10 JPEGs (at least one; linked from `jpegs`) in a folder, the rest
    members of a .tar.gz and a .zip; at n >= 1000 one member of each archive is 48 MB of
    zeros."""
    images = os.path.join(folder, "images")
    os.makedirs(images)
    photos = max(1, n // 10)  # an empty folder is an input that matches nothing
    for name in sorted(os.listdir(jpegs))[:photos]:
        os.link(os.path.join(jpegs, name), os.path.join(images, name), follow_symlinks=False)
    big = n >= 1000
    members = n - photos - 2 * big
    with tarfile.open(os.path.join(folder, "a.tar.gz"), "w:gz", compresslevel=1) as tar:
        for i in range(members // 2):
            add_member(tar, f"noise_{i:05d}.jpg", os.urandom(128 << 10))
        if big:
            add_member(tar, "zeros.jpg", bytes(48 << 20))
    with zipfile.ZipFile(os.path.join(folder, "b.zip"), "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(members - members // 2):
            z.writestr(f"noise_{i:05d}.jpg", os.urandom(128 << 10))
        if big:
            z.writestr("zeros.jpg", bytes(48 << 20))
    return [images, os.path.join(folder, "a.tar.gz"), os.path.join(folder, "b.zip")]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def photo_features(jpegs: list[str], weights: str, variant: str | None):
    """InceptionV3 features of `jpegs` as the jobs store them (TensorFlow float32, rounded
    to float16): what a trained model's decoder is timed on."""
    import numpy as np

    from model.images.preprocess import preprocess_image
    from model.images.runtimes import build_encoder

    encode = build_encoder(weights, "float32", variant, "tensorflow")
    pixels = np.stack([preprocess_image(Path(p).read_bytes()).pixels for p in jpegs])
    return np.asarray(encode(pixels)).astype(np.float32)


def decoder_rate(model, batch_size: int, beam_size: int, repeats: int = 3, features=None) -> Rate:
    """Decoding alone (features -> captions, max_length 20), `repeats` batches: of
    `features` (batch_size, 64, 2048), else of noise (an untrained model runs all 20
    steps on it)."""
    import numpy as np
    import tensorflow as tf

    from model.decoding.decoders import make_decoder

    decode = make_decoder(model, 20, beam_size=beam_size)
    if features is None:
        features = np.random.RandomState(0).randn(batch_size, 64, 2048)
    feats = tf.constant(features, tf.float32)
    return timed(lambda: decode(feats)["token_ids"].numpy(), len(features), repeats)


def beam_report(model, batch_size: int, job_seconds, images: int, features=None) -> None:
    """Beam 3 against greedy, measured interleaved in this run: decoder alone, then the job."""
    rates = {1: 0.0, 3: 0.0}
    for _ in range(2):
        for k in rates:
            rate = decoder_rate(model, batch_size, k, features=features)
            rates[k] = max(rates[k], rate.per_second)
    n = max(8, images // 4)
    jobs = {1: 0.0, 3: 0.0}
    for _ in range(2):  # interleaved, best of two: the machine's load drifts
        for k in jobs:
            jobs[k] = max(jobs[k], n / job_seconds(n, "--beam_size", str(k)))
    greedy_job, beam_job = jobs[1], jobs[3]
    print(
        f"caption: decoder alone: greedy {rates[1]:.1f} images/s, beam 3 {rates[3]:.1f} "
        f"images/s, ratio {rates[3] / rates[1]:.2f}\n"
        f"caption: whole job over {n} images: greedy {greedy_job:.2f} images/s, "
        f"beam 3 {beam_job:.2f} images/s, ratio {beam_job / greedy_job:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
