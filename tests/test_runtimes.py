"""InceptionV3 on OpenVINO (`--runtime openvino`): the same network as TensorFlow's, the
same captions, recorded where it changes the numbers."""

import json

import numpy as np
import pytest

from beam_jobs.caption_images import run as caption_run
from model.cli import UsageError
from model.images.runtimes import build_encoder
from tests.fixtures import write_tiny_export
from tests.helpers import encode, noise
from tests.tables import caption_rows

pytest.importorskip("openvino")
RUNNER = ["--runner", "FnApiRunner", "--progress_seconds", "0"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of its own: the converted network is made here, once."""
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_openvino_encoder_is_tensorflows_network_converted_once(cache):
    pixels = np.random.RandomState(0).randint(0, 256, (3, 299, 299, 3)).astype(np.uint8)
    expected = build_encoder("none", "float32", None, "tensorflow")(pixels)
    got = build_encoder("none", "float32", None, "openvino")(pixels)
    assert got.shape == expected.shape == (3, 64, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())
    (converted,) = (cache / "openvino").iterdir()
    made = (converted / "encoder.xml").stat().st_mtime_ns
    again = build_encoder("none", "float32", None, "openvino")(pixels)  # from the cache
    np.testing.assert_array_equal(again, got)
    assert (converted / "encoder.xml").stat().st_mtime_ns == made
    assert [p.name for p in (cache / "openvino").iterdir()] == [converted.name]


def test_caption_images_on_openvino_gives_tensorflows_captions_and_says_so(cache, tmp_path):
    """Same captions; the table's precision column names the runtime, so a run with
    the other one cannot add to the table unnoticed."""
    export = write_tiny_export(str(tmp_path / "export"))
    images = tmp_path / "in"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(encode(noise(700 + i), "JPEG"))
    base = ["--model", export, "--input", str(images), *RUNNER]
    caption_run([*base, "--output_dir", str(tmp_path / "tf")])
    caption_run([*base, "--output_dir", str(tmp_path / "ov"), "--runtime", "openvino"])
    tf_rows = {r["uri"]: r for r in caption_rows(tmp_path / "tf")[0]}
    ov_rows = {r["uri"]: r for r in caption_rows(tmp_path / "ov")[0]}
    assert {u: r["caption"] for u, r in ov_rows.items()} == {
        u: r["caption"] for u, r in tf_rows.items()
    }
    assert {r["precision"] for r in ov_rows.values()} == {"openvino/float32"}
    assert {r["precision"] for r in tf_rows.values()} == {"float32"}
    with pytest.raises(UsageError, match="precision"):
        caption_run([*base, "--output_dir", str(tmp_path / "ov"), "--skip_existing"])


def test_features_on_openvino_are_recorded_and_a_split_added_takes_the_runtime(cache, tmp_path):
    from beam_jobs.extract_features import run as extract_run
    from demo.make_shapes import make_split

    root, out = tmp_path / "data", tmp_path / "features"
    for split, first in (("train", 0), ("val", 100)):
        make_split(str(root), split, 4, seed=1, first_id=first)

    def extract(split, *flags):
        return extract_run(
            [
                "--split",
                split,
                "--captions_json",
                str(root / "annotations" / f"captions_{split}.json"),
            ]
            + ["--images_dir", str(root / split), "--output_dir", str(out), *RUNNER, *flags]
        )

    extract("train", "--weights", "none", "--runtime", "openvino")
    assert json.loads((out / "manifest.json").read_text())["runtime"] == "openvino"
    extract("val")  # weights, precision and runtime from the manifest
    with pytest.raises(UsageError, match="runtime='openvino'"):
        extract("val", "--runtime", "tensorflow")
