import gzip
import io

import apache_beam as beam
import pytest
import tensorflow as tf

from beam_jobs import tfrecord_sink
from beam_jobs.tfrecord_sink import BackgroundGzipWriter, WriteGzipTFRecords, tfrecord_frame


def test_frame_matches_tensorflow_writer(tmp_path):
    path = str(tmp_path / "tf.tfrecord")
    records = [b"", b"a", bytes(range(256)) * 50]
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    assert b"".join(tfrecord_frame(r) for r in records) == open(path, "rb").read()


def test_pipeline_shards_read_back_with_tf_data(tmp_path, monkeypatch):
    monkeypatch.setattr(tfrecord_sink, "_CHUNK", 1000)  # many chunks through the thread
    records = [f"record {i} ".encode() * (i % 50 + 1) for i in range(300)]
    with beam.Pipeline("FnApiRunner") as p:
        _ = p | beam.Create(records) | WriteGzipTFRecords(str(tmp_path / "part"), num_shards=3)
    files = sorted(str(f) for f in tmp_path.glob("part-*-of-00003.tfrecord.gz"))
    assert len(files) == 3
    read = tf.data.TFRecordDataset(files, compression_type="GZIP")
    assert sorted(r.numpy() for r in read) == sorted(records)


def test_streaming_shards_roll_over_at_the_record_limit(tmp_path):
    records = [f"r{i}".encode() for i in range(250)]
    with beam.Pipeline("FnApiRunner") as p:
        _ = (
            p
            | beam.Create(records)
            | WriteGzipTFRecords(str(tmp_path / "part"), max_records_per_shard=100)
        )
    files = sorted(str(f) for f in tmp_path.glob("part-*.tfrecord.gz"))
    counts = [sum(1 for _ in tf.data.TFRecordDataset(f, compression_type="GZIP")) for f in files]
    assert sum(counts) == 250 and max(counts) <= 100
    assert all(f.endswith(f"-of-{len(files):05d}.tfrecord.gz") for f in files)


class _FailingFile(io.BytesIO):
    def write(self, data: bytes) -> int:
        raise OSError("disk full")


def test_write_errors_surface_on_close(monkeypatch):
    monkeypatch.setattr(tfrecord_sink, "_CHUNK", 10)
    writer = BackgroundGzipWriter(_FailingFile())
    with pytest.raises(OSError, match="disk full"):
        for _ in range(100):
            writer.write(b"x" * 20)
        writer.close()


def test_output_is_plain_gzip():
    raw = io.BytesIO()
    raw.close = lambda: None  # keep the buffer readable after the writer closes it
    writer = BackgroundGzipWriter(raw)
    writer.write(b"hello ")
    writer.write(b"world")
    writer.close()
    assert gzip.decompress(raw.getvalue()) == b"hello world"
