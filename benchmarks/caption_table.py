"""What a caption run's commit costs as its table grows, and what compaction buys.

    python -m benchmarks.caption_table [--files 100,1000,10000] [--rows 10]

Builds caption tables of N data files (written as a run's workers write them, committed
100 files a commit, as daily runs would), then times, on each:
- plan: what a run reads of the table before it starts (version, settings from the
  per-file statistics, the file list);
- commit: one run of 2 new files committed on top;
- read all: reading every file's `caption`, `hit_max_length` and `model_id` columns, what
  the hand-made commit before the Delta table did at each commit (its whole-table
  looping figures and model check): the old commit's cost, at the least.
Then compacts the largest table and times plan and commit again. Local disk, one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from beam_jobs import caption_table
from beam_jobs.parts import part_name, read_parquet, write_part
from model.io import formats

SETTINGS = {
    "model_id": "m" * 16,
    "precision": "float32",
    "beam_size": 1,
    "length_penalty": 0.0,
    "block_repeats": 3,
    "allow_unk": False,
}


def rows(first: int, count: int) -> list[dict]:
    return [
        {
            "uri": f"/photos/{i:09d}.jpg",
            "key": f"/photos/{i:09d}.jpg",
            **SETTINGS,
            "caption": "a dog runs on the grass",
            "token_ids": [4, 5, 6, 7, 8, 9],
            "log_prob": -5.0,
            "length": 6,
            "hit_max_length": False,
            "repeated_trigram": False,
            "width": 640,
            "height": 480,
            "sha256": "0" * 64,
            "run_id": "bench",
        }
        for i in range(first, first + count)
    ]


def build(folder: str, files: int, per_file: int) -> None:
    batch = []
    version = None
    for f in range(files):
        data = rows(f * per_file, per_file)
        batch.append(
            write_part(
                folder,
                part_name("part-bench", data),
                data,
                formats.CAPTION_TABLE_SCHEMA,
                formats.PARQUET_CODEC,
            )
        )
        if len(batch) == 100 or f == files - 1:
            caption_table.commit(folder, version, batch, [], version is None, {"bench": True})
            version = caption_table.open_table(folder).version()
            batch = []


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plan(folder: str) -> None:
    table = caption_table.open_table(folder)
    caption_table.table_settings(table)
    caption_table.data_files(table)


def commit_one_run(folder: str, first: int) -> float:
    parts = []
    for i in range(2):
        data = rows(first + i * 10, 10)
        parts.append(
            write_part(
                folder,
                part_name("part-new", data),
                data,
                formats.CAPTION_TABLE_SCHEMA,
                formats.PARQUET_CODEC,
            )
        )
    version = caption_table.open_table(folder).version()
    return timed(lambda: caption_table.commit(folder, version, parts, [], False, {"b": 1}))


def read_all(folder: str) -> None:
    for uri in caption_table.data_files(caption_table.open_table(folder)):
        read_parquet(uri, ["caption", "hit_max_length", "model_id"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="100,1000,10000")
    p.add_argument("--rows", type=int, default=10, help="rows per data file")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="table_bench_")
    sizes = [int(n) for n in a.files.split(",")]
    print(
        f"{'data files':>10} {'build s':>8} {'plan s':>8} {'commit s':>9} {'read all s':>11}"
        f" {'read all / commit':>18}"
    )
    try:
        for n in sizes:
            folder = os.path.join(root, f"t{n}")
            built = timed(lambda folder=folder, n=n: build(folder, n, a.rows))
            planned = timed(lambda folder=folder: plan(folder))
            committed = commit_one_run(folder, 10**8)
            everything = timed(lambda folder=folder: read_all(folder))
            print(
                f"{n:>10} {built:>8.1f} {planned:>8.3f} {committed:>9.3f} {everything:>11.2f}"
                f" {everything / committed:>17.0f}x",
                flush=True,
            )
        compact = timed(lambda: caption_table.compact(folder))
        after = len(caption_table.data_files(caption_table.open_table(folder)))
        print(f"\ncompacting the {sizes[-1]}-file table: {compact:.1f} s, {after} file(s) after")
        print(
            f"after compaction: plan {timed(lambda: plan(folder)):.3f} s, "
            f"commit {commit_one_run(folder, 2 * 10**8):.3f} s, "
            f"read all {timed(lambda: read_all(folder)):.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
