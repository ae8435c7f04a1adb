"""The serving SavedModel: built by its command for an existing export, same captions
as caption_images on every image format the job accepts."""

import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from beam_jobs.caption_images import run as caption_run
from model.serving import run as serving_run
from tests.fixtures import write_tiny_export
from tests.helpers import encode, good_images, noise

# TensorFlow cannot read EXIF orientation: the served model sees this photo as stored.
NOT_UPRIGHT = {"exif_rotated.jpg"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    export = write_tiny_export(str(root / "export"))
    images = root / "images"
    images.mkdir()
    files = dict(good_images())
    files["photo_1280.jpg"] = encode(noise(5, (1280, 960)), "JPEG")  # decoded at 1/4 scale
    files["photo_640.jpg"] = encode(noise(6, (640, 480)), "JPEG")  # at 1/2 scale
    files["large.png"] = encode(noise(7, (800, 600)), "PNG")
    for name, data in files.items():
        (images / name).write_bytes(data)
    path = serving_run(["--model", export])
    caption_run(
        ["--model", export, "--input", str(images), "--output_dir", str(root / "captions")]
        + ["--runner", "FnApiRunner", "--progress_seconds", "0"]
    )
    rows = pq.read_table(sorted(str(p) for p in (root / "captions").glob("captions-*.parquet")))
    bulk = {r["uri"].rsplit("/", 1)[-1]: r for r in rows.to_pylist()}
    fn = tf.saved_model.load(path).signatures["serving_default"]
    names = sorted(files)
    out = fn(images=tf.constant([files[n] for n in names]))
    return path, names, {k: v.numpy() for k, v in out.items()}, bulk


def test_the_command_writes_export_serving(served):
    path, *_ = served
    assert path.endswith("/export/serving")
    loaded = tf.saved_model.load(path)
    spec = loaded.signatures["serving_default"].structured_input_signature[1]
    assert list(spec) == ["images"] and spec["images"].dtype == tf.string
    assert spec["images"].shape.as_list() == [None]


def test_served_captions_equal_the_bulk_job_on_every_format(served):
    _, names, out, bulk = served
    assert set(bulk) == set(names)  # every format captioned by the job too
    for i, name in enumerate(names):
        row = bulk[name]
        if name in NOT_UPRIGHT:
            assert (out["width"][i], out["height"][i]) == (row["height"], row["width"])
            continue
        assert out["caption"][i].decode() == row["caption"], name
        assert out["token_ids"][i][: out["length"][i]].tolist() == row["token_ids"], name
        assert out["log_prob"][i] == pytest.approx(row["log_prob"], abs=0.05), name
        assert (out["width"][i], out["height"][i]) == (row["width"], row["height"]), name


def test_an_undecodable_image_fails_the_request(served):
    path, *_ = served
    fn = tf.saved_model.load(path).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn(images=tf.constant([b"not an image"]))
