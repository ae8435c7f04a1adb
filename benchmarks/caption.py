"""Benchmark: bulk-captioning job images/s vs the bare InceptionV3 forward pass.

    python -m benchmarks.caption [--images 256] [--batch_size 32]

Captions generated 640x480 JPEGs with a tutorial-size model (embedding 256,
units 512, vocabulary 5000) and prints the job's rate, the bare encoder's rate
at the same batch and precision, and the ratio (target >= 0.80).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.common import bare_inception_rate, make_jpegs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="float32")
    a = p.parse_args()
    from beam_jobs.caption_images import run
    from model.captioner import ShowAttendTell
    from model.export import save_export
    from model.extractor import features_identity
    from model.vocab import RESERVED, Vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(os.path.join(tmp, "img"), a.images)
        vocab = Vocabulary((*RESERVED, *[f"w{i}" for i in range(5000 - len(RESERVED))]))
        model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
        save_export(
            model, vocab, features_identity("none", a.precision), os.path.join(tmp, "export")
        )
        bare = bare_inception_rate(a.batch_size, a.precision)
        job = run(
            [
                "--model",
                os.path.join(tmp, "export"),
                "--input",
                os.path.join(tmp, "img"),
                "--output_dir",
                os.path.join(tmp, "out"),
                "--batch_size",
                str(a.batch_size),
                "--runner",
                "FnApiRunner",
            ]
        )["images_per_second"]
        print(
            f"caption: job {job:.2f} images/s, bare InceptionV3 {bare:.2f} images/s, "
            f"ratio {job / bare:.2f} (target >= 0.80; batch {a.batch_size}, {a.precision}, {a.images} images)"
        )


if __name__ == "__main__":
    main()
