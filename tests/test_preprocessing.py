import hashlib
import io
import logging
import tarfile

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.preprocessing import ERRORS_TAG, Loaded, PreprocessFn
from beam_jobs.runner import pipeline_options
from beam_jobs.sources import read_path
from tests.helpers import bad_images, good_images


def test_preprocess_ahead_on_threads_emits_every_input_once():
    """A lookahead smaller than the input: pixels or an error row for each input, once."""
    items = [Loaded(f"good-{n}", n, data) for n, data in sorted(good_images().items())]
    items += [Loaded(f"bad-{n}", n, data) for n, (data, _) in sorted(bad_images().items())]
    items = items * 3
    with beam.Pipeline("FnApiRunner") as p:
        out = (
            p
            | beam.Create([items])  # one element, so one bundle sees the whole sequence
            | beam.FlatMap(lambda xs: xs)
            | beam.ParDo(PreprocessFn("test", threads=2, lookahead=3)).with_outputs(
                ERRORS_TAG, main="pixels"
            )
        )
        keys = out.pixels | "Keys" >> beam.Map(lambda e: e[0].key)
        shapes = out.pixels | "Shapes" >> beam.Map(lambda e: (e[1].shape, str(e[1].dtype)))
        kinds = out[ERRORS_TAG] | beam.Map(lambda e: (e[0], e[1]["error_type"]))
        assert_that(keys, equal_to([i.key for i in items if i.key.startswith("good")]))
        assert_that(
            shapes,
            equal_to([((299, 299, 3), "uint8")] * (3 * len(good_images()))),
            label="Shapes",
        )
        expected_kinds = [(f"bad-{n}", kind) for n, (_, kind) in sorted(bad_images().items())]
        assert_that(kinds, equal_to(expected_kinds * 3), label="Kinds")


def test_files_are_read_on_the_pool_with_sha256_and_missing_ones_are_error_rows(tmp_path):
    data = good_images()["rgb.jpg"]
    (tmp_path / "a.jpg").write_bytes(data)
    items = [Loaded("a", str(tmp_path / "a.jpg")), Loaded("gone", str(tmp_path / "gone.jpg"))]
    with beam.Pipeline("FnApiRunner") as p:
        out = (
            p
            | beam.Create(items)
            | beam.ParDo(PreprocessFn("test")).with_outputs(ERRORS_TAG, main="pixels")
        )
        metas = out.pixels | beam.Map(lambda e: (e[0].key, e[0].sha256))
        errors = out[ERRORS_TAG] | beam.Map(lambda e: (e[0], e[1]["error_type"]))
        assert_that(metas, equal_to([("a", hashlib.sha256(data).hexdigest())]))
        assert_that(errors, equal_to([("gone", "missing_file")]), label="Errors")


def test_a_file_and_an_archive_member_are_read_alike(tmp_path):
    data = good_images()["rgb.jpg"]
    (tmp_path / "a.jpg").write_bytes(data)
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        info = tarfile.TarInfo("m.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    [member] = read_path(str(tmp_path / "b.tar"))
    assert member.data == data and member.uri.endswith("b.tar!/m.jpg")
    [read] = read_path(str(tmp_path / "a.jpg"))
    assert read.data == data
    [refused] = read_path(str(tmp_path / "a.jpg"), max_bytes=len(data) - 1)
    assert (refused.data, refused.error_type) == (None, "too_large")


def test_only_beams_torch_resource_notice_is_filtered(caplog):
    pipeline_options([])
    with caplog.at_level(logging.WARNING):
        logging.warning("Resource module is not available for current platform, ...")
        logging.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


@pytest.mark.parametrize("flag", ["--decode_threads", "--batch_size"])
def test_counts_must_be_positive_at_start(flag, capsys):
    from beam_jobs.caption_images import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--input", "i", "--output_dir", "o", flag, "0"])
    assert "must be a positive integer, got '0'" in capsys.readouterr().err


def test_a_zip_bomb_is_inflated_no_further_than_max_bytes(tmp_path):
    """A 300 KB zip whose directory claims 100 bytes for a member that inflates to 300 MB:
    the member is read through a bounded stream (`ZipFile.read` would inflate up to
    2 GiB per call), so memory stays near --max_bytes, and the member is one error row."""
    import struct
    import tracemalloc
    import zipfile

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("bomb.jpg", "w") as f:
        for _ in range(300):
            f.write(b"\0" * (1 << 20))
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory's entry: uncompressed size
    data[entry + 24 : entry + 28] = struct.pack("<I", 100)
    path.write_bytes(bytes(data))
    tracemalloc.start()
    (item,) = list(read_path(str(path), max_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert item.data is None and item.error_type in ("corrupt", "too_large"), item
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB inflated"
