"""Benchmark: captioning a table of URLs against the same images in a folder.

    python -m benchmarks.urls [--images 1000] [--memory_rows 10000]

Serves `--images` 640x480 JPEGs from a local HTTP server (`python -m http.server` in a
process of its own, on loopback) and captions them twice with a tutorial-size model, in
alternating rounds: from a Parquet table of their URLs (`--input_table`, fetched with
`--decode_threads 8`) and from the folder (`--input`). Prints both images/s and the
ratio: the cost of fetching over HTTP. Then the peak memory of a whole local run over
tables of N and 10N rows (URLs the server answers 404, so the run is all fetches and
error rows; default 10,000 and 100,000), each in a fresh process, and the ratio.
Several minutes on 2 cores (the 10N run fetches 100,000 URLs).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.common import make_jpegs, peak_rss_mb, tutorial_export


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def write_url_table(path: str, urls: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(urls))), "url": urls}), path)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--memory_rows", type=int, default=10_000, help="N of N vs 10N (0: skip)")
    a = p.parse_args()
    from model.quiet import import_tensorflow

    import_tensorflow()
    from beam_jobs.caption_images import run

    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "img")
        names = make_jpegs(images, a.images)
        export, _ = tutorial_export(os.path.join(tmp, "export"), "float32")
        server, base = serve(images)
        try:
            table = os.path.join(tmp, "urls.parquet")
            write_url_table(table, [f"{base}/{n}" for n in names])
            common = ["--model", export, "--batch_size", str(a.batch_size)]
            common += ["--runner", "FnApiRunner", "--progress_seconds", "0"]
            argv = {
                "folder": [*common, "--input", images],
                "urls": [*common, "--input_table", table, "--decode_threads", "8"],
            }
            best = {k: 0.0 for k in argv}
            for r in range(a.rounds):
                for kind, args in argv.items():
                    out = os.path.join(tmp, f"out-{kind}-{r}")
                    summary = run([*args, "--output_dir", out])
                    assert summary["captioned"] == a.images, summary
                    best[kind] = max(best[kind], summary["images_per_second"])
            print(
                f"urls: {a.images} images end to end, best of {a.rounds}: folder "
                f"{best['folder']:.2f} images/s, URL table {best['urls']:.2f} images/s "
                f"(ratio {best['urls'] / best['folder']:.2f}: the fetch overhead)",
                flush=True,
            )
            if a.memory_rows:
                peaks = []
                for n in (a.memory_rows, 10 * a.memory_rows):
                    rows = os.path.join(tmp, f"rows{n}.parquet")
                    write_url_table(rows, [f"{base}/missing/{i}.jpg" for i in range(n)])
                    args = [*common, "--input_table", rows, "--decode_threads", "8"]
                    args += ["--output_dir", os.path.join(tmp, f"mem{n}")]
                    start = time.perf_counter()
                    peak, summary = peak_rss_mb("beam_jobs.caption_images", args)
                    assert summary["failed"] == n, summary
                    peaks.append((n, peak, time.perf_counter() - start))
                (n0, p0, s0), (n1, p1, s1) = peaks
                print(
                    f"urls: peak memory of a local run (launcher and FnApiRunner workers in one "
                    f"process) {p0:.0f} MB at {n0} rows ({s0:.0f}s), {p1:.0f} MB at {n1} rows "
                    f"({s1:.0f}s): ratio {p1 / p0:.2f}",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
