"""Benchmark: peak memory of the serving SavedModel, per request, in a fresh process each.

    python -m benchmarks.serving

Builds a tutorial-size export (random weights: memory does not depend on them) and its
serving graph, then measures the peak resident memory of a process that loads the
SavedModel and answers one request of: nothing (the loaded model), 32 ordinary
640x480 photos, and one 20000x20000 PNG (1.2 MB on disk, 400 MP once decoded) next to
one photo. The graph reads sizes from the file header before decoding, so the PNG is
refused (`decompression_bomb`) without its pixel buffer. About two minutes on 2 cores.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

from benchmarks.common import make_jpegs, peak_rss_mb


def run(argv: list[str]) -> dict:
    """In the measured process: load `argv[0]` and send the request `argv[1]` names."""
    from model.quiet import import_tensorflow

    tf = import_tensorflow()
    serving, request, images_dir = argv
    fn = tf.saved_model.load(serving).signatures["serving_default"]
    photos = []
    for name in sorted(os.listdir(images_dir)):
        with open(os.path.join(images_dir, name), "rb") as f:
            photos.append(f.read())
    if request == "load":
        return {"errors": []}
    if request == "photos":
        images = photos[:32]
    else:
        from PIL import Image

        bomb = io.BytesIO()
        Image.new("1", (20000, 20000)).save(bomb, "PNG")
        images = [bomb.getvalue(), photos[0]]
    started = time.perf_counter()
    out = fn(images=tf.constant(images))
    return {
        "errors": [e.decode() for e in out["error"].numpy()],
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    from model.images.extractor import features_identity
    from model.inference.saved_model import write_serving_export
    from model.network.captioner import ShowAttendTell
    from model.network.export import save_export
    from model.text.vocab import RESERVED, Vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "img")
        make_jpegs(images, 32)
        vocab = Vocabulary((*RESERVED, *[f"w{i}" for i in range(5000 - len(RESERVED))]))
        export = os.path.join(tmp, "export")
        model = ShowAttendTell(vocab_size=5000, embedding_dim=256, units=512)
        save_export(model, vocab, features_identity("none"), export)
        serving = write_serving_export(export)
        print(f"{'request':<40}{'peak RSS MB':>12}{'seconds':>9}  errors")
        for request, label in (
            ("load", "none (model loaded)"),
            ("photos", "32 photos, 640x480 JPEG"),
            ("bomb", "20000x20000 PNG + 1 photo"),
        ):
            peak, out = peak_rss_mb("benchmarks.serving", [serving, request, images])
            errors = sorted({e for e in out["errors"] if e}) or "-"
            print(f"{label:<40}{peak:>12.0f}{out.get('seconds', 0):>9.2f}  {errors}", flush=True)


if __name__ == "__main__":
    main()
