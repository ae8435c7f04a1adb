import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.parts import WritePartsFn, part_name, without_overlaps, write_part

SCHEMA = pa.schema([("uri", pa.string()), ("n", pa.int64())])
ROWS = pa.schema(
    [
        ("uri", pa.string()),
        ("key", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def rows(*uris):
    return [{"uri": u, "key": u} for u in uris]


def test_parts_hold_every_row_once_and_are_named_by_their_rows(tmp_path):
    folder = str(tmp_path)
    data = rows(*[f"u{i}" for i in range(7)])
    written = []
    for _ in range(2):  # a retried bundle writes the same names again
        with beam.Pipeline("FnApiRunner") as p:
            paths = (
                p
                | beam.Create(data, reshuffle=False)
                | beam.ParDo(WritePartsFn(folder, "captions-r1", ROWS, "zstd", 60.0, 3))
            )
            assert_that(paths | beam.Map(lambda part: part["rows"]), equal_to([3, 3, 1]))
        written.append(sorted(p.name for p in tmp_path.glob("captions-r1-*.parquet")))
    assert written[0] == written[1] and len(written[0]) == 3
    table = pq.read_table([str(tmp_path / n) for n in written[0]])
    assert sorted(table.column("uri").to_pylist()) == [f"u{i}" for i in range(7)]
    assert not list(tmp_path.glob("inflight-*"))


def test_a_part_whose_rows_an_earlier_part_holds_is_left_out(tmp_path):
    folder = str(tmp_path)

    def write(prefix, data):
        return (
            f"{folder}/" + write_part(folder, part_name(prefix, data), data, ROWS, "zstd")["name"]
        )

    a = write("captions-r", rows("u1", "u2"))
    b = write("captions-r", rows("u2", "u3"))
    c = write("errors-r", rows("u4"))
    # Two claims on one key are two rows (`duplicate_key` rows differ in their message).
    first = {"uri": "u5", "key": "k", "error_type": "duplicate_key", "message": "claim 2"}
    d = write("errors-r", [first])
    e = write("errors-r", [{**first, "message": "claim 3"}])
    assert d != e
    kept = without_overlaps(sorted([a, b, c, d, e], key=lambda p: (p != a, p)))
    assert sorted(kept) == sorted([a, c, d, e])
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
