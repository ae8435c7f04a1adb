import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.parts import WritePartsFn, part_name, without_overlaps, write_part

SCHEMA = pa.schema([("uri", pa.string()), ("n", pa.int64())])


def rows(*uris):
    return [{"uri": u, "n": i} for i, u in enumerate(uris)]


def test_parts_hold_every_row_once_and_are_named_by_their_uris(tmp_path):
    folder = str(tmp_path)
    data = rows(*[f"u{i}" for i in range(7)])
    written = []
    for _ in range(2):  # a retried bundle writes the same names again
        with beam.Pipeline("FnApiRunner") as p:
            paths = (
                p
                | beam.Create(data, reshuffle=False)
                | beam.ParDo(WritePartsFn(folder, "captions-r1", SCHEMA, "zstd", 60.0, 3))
            )
            assert_that(paths | beam.Map(lambda part: part["rows"]), equal_to([3, 3, 1]))
        written.append(sorted(p.name for p in tmp_path.glob("captions-r1-*.parquet")))
    assert written[0] == written[1] and len(written[0]) == 3
    table = pq.read_table([str(tmp_path / n) for n in written[0]])
    assert sorted(table.column("uri").to_pylist()) == [f"u{i}" for i in range(7)]
    assert not list(tmp_path.glob("inflight-*"))


def test_a_part_whose_uris_an_earlier_part_holds_is_left_out(tmp_path):
    folder = str(tmp_path)

    def write(prefix, data):
        return (
            f"{folder}/" + write_part(folder, part_name(prefix, data), data, SCHEMA, "zstd")["name"]
        )

    a = write("captions-r", rows("u1", "u2"))
    b = write("captions-r", rows("u2", "u3"))
    c = write("errors-r", rows("u4"))
    kept = without_overlaps(sorted([a, b, c], key=lambda p: (p != a, p)))
    assert kept == [a, c]
    assert os.path.exists(b)  # left for vacuum: no command deletes files before its commit


def test_part_statistics_are_the_rows_own(tmp_path):
    """Readers skip files by these (DuckDB, Spark): min/max, null counts, row count."""
    import json

    data = [{"uri": "b", "n": 5}, {"uri": "a", "n": None}, {"uri": "c", "n": -2}]
    part = write_part(str(tmp_path), "p.parquet", data, SCHEMA, "zstd")
    stats = json.loads(part["stats"])
    assert stats == {
        "numRecords": 3,
        "minValues": {"uri": "a", "n": -2},
        "maxValues": {"uri": "c", "n": 5},
        "nullCount": {"uri": 0, "n": 1},
    }
    assert part["size"] == (tmp_path / "p.parquet").stat().st_size
