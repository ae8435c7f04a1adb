"""Benchmark: feature-extraction job images/s vs the bare InceptionV3 forward pass.

    python -m benchmarks.extract [--images 1024] [--batch_size 32] [--precision float32]
        [--runtime openvino] [--photos FOLDER]

Runs the job on 640x480 JPEGs (or the first of --photos) at images/8 and at images, and
prints, next to the bare model's rate at the same batch and precision:
- the steady-state rate (extra images over extra seconds), target >= 0.85 of bare;
- the fixed start-up (model build, tracing, pipeline start, 2-4 s here) and the
  end-to-end rate, which approaches the steady state as the corpus grows;
- peak memory at N and 10N images (target: flat, nothing held per image).
A few minutes on 2 cores.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.common import (
    bare_inception_rate,
    decoding_cpu_ms,
    encoder_flags,
    job_bench_args,
    job_jpegs,
    job_rates,
    report,
    report_memory,
    write_coco,
)


def main() -> None:
    a = job_bench_args(__doc__)
    from beam_jobs.extract_features import run

    with tempfile.TemporaryDirectory() as tmp:
        count = max(a.images, 10 * a.memory_images)
        names = job_jpegs(os.path.join(tmp, "img"), count, a.photos)
        jpegs = [os.path.join(tmp, "img", n) for n in names]
        encoder = encoder_flags(a, tmp, jpegs)

        def argv_for(n: int) -> list[str]:
            ann = os.path.join(tmp, f"ann{n}.json")
            write_coco(ann, names[:n])
            return [
                "--split",
                "train",
                "--captions_json",
                ann,
                "--images_dir",
                os.path.join(tmp, "img"),
                "--output_dir",
                os.path.join(tmp, f"out{n}"),
                "--weights",
                "none",
                "--batch_size",
                str(a.batch_size),
                *encoder,
                "--runner",
                "FnApiRunner",
                "--progress_seconds",
                "0",
            ]

        bare = bare_inception_rate(a.batch_size, a.precision, 6, a.runtime, a.calibration)
        rates = job_rates(lambda n: run(argv_for(n))["seconds"], a.images)
        decoding = decoding_cpu_ms(jpegs[:64])
        detail = f"batch {a.batch_size}, {a.runtime} {a.precision}"
        report("extract", rates, bare, 0.85, detail, {"JPEG decoding": decoding})
        if a.memory_images:
            report_memory("extract", "beam_jobs.extract_features", argv_for, a.memory_images)


if __name__ == "__main__":
    main()
