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
            assert_that(paths | beam.Map(lambda s: s.startswith(folder)), equal_to([True] * 3))
        written.append(sorted(p.name for p in tmp_path.glob("captions-r1-*.parquet")))
    assert written[0] == written[1] and len(written[0]) == 3
    table = pq.read_table([str(tmp_path / n) for n in written[0]])
    assert sorted(table.column("uri").to_pylist()) == [f"u{i}" for i in range(7)]
    assert not list(tmp_path.glob(".inflight-*"))


def test_a_part_whose_uris_an_earlier_part_holds_is_dropped(tmp_path):
    folder = str(tmp_path)
    a = write_part(
        folder, part_name("captions-r", rows("u1", "u2")), rows("u1", "u2"), SCHEMA, "zstd"
    )
    b = write_part(
        folder, part_name("captions-r", rows("u2", "u3")), rows("u2", "u3"), SCHEMA, "zstd"
    )
    c = write_part(folder, part_name("errors-r", rows("u4")), rows("u4"), SCHEMA, "zstd")
    kept = without_overlaps(sorted([a, b, c], key=lambda p: (p != a, p)))
    assert kept == [a, *sorted([c])] and not (tmp_path / b.rsplit("/", 1)[1]).exists()
