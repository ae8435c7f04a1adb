"""Benchmark: bulk-captioning job images/s vs the bare InceptionV3 forward pass.

    python -m benchmarks.caption [--images 1024] [--batch_size 32]

Captions 640x480 JPEGs with a tutorial-size model (embedding 256, units 512,
vocabulary 5000) at images/8 and at images, and prints, next to the bare
encoder's rate at the same batch and precision: the steady-state rate (target
>= 0.80 of bare; greedy decoding is part of the job's cost), the fixed
start-up and the end-to-end rate; then peak memory at N and 10N images
(target: flat). A few minutes on 2 cores.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.common import (
    bare_inception_rate,
    job_bench_args,
    job_rates,
    make_jpegs,
    report,
    report_memory,
)


def main() -> None:
    a = job_bench_args(__doc__)
    from beam_jobs.caption_images import run
    from model.captioner import ShowAttendTell
    from model.export import save_export
    from model.extractor import features_identity
    from model.vocab import RESERVED, Vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        names = make_jpegs(os.path.join(tmp, "img"), max(a.images, 10 * a.memory_images))
        vocab = Vocabulary((*RESERVED, *[f"w{i}" for i in range(5000 - len(RESERVED))]))
        model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
        export = os.path.join(tmp, "export")
        save_export(model, vocab, features_identity("none", a.precision), export)

        def argv_for(n: int) -> list[str]:
            folder = os.path.join(tmp, f"in{n}")
            if not os.path.isdir(folder):
                os.makedirs(folder)
                for name in names[:n]:
                    os.link(os.path.join(tmp, "img", name), os.path.join(folder, name))
            return [
                "--model",
                export,
                "--input",
                folder,
                "--output_dir",
                os.path.join(tmp, f"out{n}"),
                "--batch_size",
                str(a.batch_size),
                "--precision",
                a.precision,
                "--runner",
                "FnApiRunner",
            ]

        bare = bare_inception_rate(a.batch_size, a.precision)
        rates = job_rates(lambda n: run(argv_for(n))["seconds"], a.images)
        report("caption", rates, bare, 0.80, f"batch {a.batch_size}, {a.precision}")
        if a.memory_images:
            report_memory("caption", "beam_jobs.caption_images", argv_for, a.memory_images)


if __name__ == "__main__":
    main()
