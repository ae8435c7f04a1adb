"""Benchmark: feature-extraction job images/s vs the bare InceptionV3 forward pass.

    python -m benchmarks.extract [--images 256] [--batch_size 32] [--precision float32]

Prints both rates and their ratio (target >= 0.85), then the job's peak memory
at N and 10N images (target: flat). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.common import bare_inception_rate, make_jpegs, peak_rss_mb, write_coco


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="float32")
    p.add_argument(
        "--memory_images", type=int, default=40, help="N for the N vs 10N memory check (0: skip)"
    )
    a = p.parse_args()
    from beam_jobs.extract_features import run

    with tempfile.TemporaryDirectory() as tmp:
        names = make_jpegs(os.path.join(tmp, "img"), max(a.images, 10 * a.memory_images))
        write_coco(os.path.join(tmp, "ann.json"), names[: a.images])
        bare = bare_inception_rate(a.batch_size, a.precision)
        argv = [
            "--split",
            "train",
            "--captions_json",
            os.path.join(tmp, "ann.json"),
            "--images_dir",
            os.path.join(tmp, "img"),
            "--output_dir",
            os.path.join(tmp, "out"),
            "--weights",
            "none",
            "--batch_size",
            str(a.batch_size),
            "--precision",
            a.precision,
            "--runner",
            "FnApiRunner",
        ]
        job = run(argv)["images_per_second"]
        print(
            f"extract: job {job:.2f} images/s, bare InceptionV3 {bare:.2f} images/s, "
            f"ratio {job / bare:.2f} (target >= 0.85; batch {a.batch_size}, {a.precision}, {a.images} images)"
        )
        if a.memory_images:
            peaks = []
            for n in (a.memory_images, 10 * a.memory_images):
                ann = os.path.join(tmp, f"ann{n}.json")
                write_coco(ann, names[:n])
                mem_argv = [*argv, "--output_dir", os.path.join(tmp, f"mem{n}")]
                mem_argv[mem_argv.index("--captions_json") + 1] = ann
                peaks.append(peak_rss_mb("beam_jobs.extract_features", mem_argv))
            print(
                f"extract: peak memory {peaks[0]:.0f} MB at {a.memory_images} images, "
                f"{peaks[1]:.0f} MB at {10 * a.memory_images} (ratio {peaks[1] / peaks[0]:.2f}, target ~1)"
            )


if __name__ == "__main__":
    main()
