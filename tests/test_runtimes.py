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
    assert got.shape == expected.shape == (3, 64, 2048) and got.dtype == np.float16
    got, expected = got.astype(np.float32), expected.astype(np.float32)
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


def extractor(root, out):
    """extract(split, *flags): extract_features of a split of the shapes at `root` into `out`."""
    from beam_jobs.extract_features import run as extract_run

    def extract(split, *flags):
        captions = str(root / "annotations" / f"captions_{split}.json")
        return extract_run(
            ["--split", split, "--captions_json", captions, "--images_dir", str(root / split)]
            + ["--output_dir", str(out), *RUNNER, *flags]
        )

    return extract


def test_features_on_openvino_are_recorded_and_a_split_added_takes_the_runtime(cache, tmp_path):
    from demo.make_shapes import make_split

    root, out = tmp_path / "data", tmp_path / "features"
    for split, first in (("train", 0), ("val", 100)):
        make_split(str(root), split, 4, seed=1, first_id=first)

    extract = extractor(root, out)

    extract("train", "--weights", "none", "--runtime", "openvino")
    assert json.loads((out / "manifest.json").read_text())["runtime"] == "openvino"
    extract("val")  # weights, precision and runtime from the manifest
    with pytest.raises(UsageError, match="runtime='openvino'"):
        extract("val", "--runtime", "tensorflow")


@pytest.mark.slow
def test_int8_calibrated_on_your_photos_is_recorded_from_features_to_captions(cache, tmp_path):
    """`model.images.calibrate` quantizes the encoder on a folder of photos; features made
    with it record its id (and a split added takes it), a model trained on them captions
    with it by default, its rows say `openvino/int8@ID`; its features are close to float32's
    but not equal (it is int8); int8 without the runtime or the calibration, or a
    calibration of other weights, is one line."""
    from demo.make_shapes import make_split
    from model.images.calibrate import run as calibrate_run

    root, out, cal = tmp_path / "data", tmp_path / "features", tmp_path / "int8"
    for split, first in (("train", 0), ("val", 100)):
        make_split(str(root), split, 6, seed=2, first_id=first)
    record = calibrate_run(
        ["--weights", "none", "--images", str(root / "train"), "--output", str(cal)]
    )
    assert record["images"] == 6 and sorted(p.name for p in cal.iterdir()) == [
        "calibration.json",
        "encoder.bin",
        "encoder.xml",
    ]
    pixels = np.random.RandomState(1).randint(0, 256, (2, 299, 299, 3)).astype(np.uint8)
    f32 = build_encoder("none", "float32", None, "openvino")(pixels)
    int8 = build_encoder("none", "int8", None, "openvino", str(cal))(pixels)
    f32, int8 = f32.astype(np.float32), int8.astype(np.float32)
    cosine = (f32 * int8).sum() / np.linalg.norm(f32) / np.linalg.norm(int8)
    assert 0.5 < cosine < 1.0 and not np.array_equal(f32, int8)

    extract = extractor(root, out)

    extract(
        "train",
        "--weights",
        "none",
        "--runtime",
        "openvino",
        "--precision",
        "int8",
        "--calibration",
        str(cal),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["precision"], manifest["calibration"]) == ("int8", record["id"])
    extract("val")  # weights, precision, runtime and calibration from the manifest
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["images"] == 6

    from model.images.extractor import features_identity

    trained_on = features_identity("none", "int8", runtime="openvino", calibration=str(cal))
    export = write_tiny_export(str(tmp_path / "export"), features=trained_on)
    rows_out = tmp_path / "captions"
    caption_run(
        ["--model", export, "--input", str(root / "val"), "--output_dir", str(rows_out), *RUNNER]
    )
    caps, _ = caption_rows(rows_out)
    assert {r["precision"] for r in caps} == {f"openvino/int8@{record['id']}"}

    # A float32-trained model scores int8 features only when asked (evaluate --any_precision).
    from model.evaluate import run as evaluate_run
    from model.io.formats import FormatError

    f32 = write_tiny_export(str(tmp_path / "f32"))
    scored = ["--model", f32, "--data_dir", str(out), "--split", "val", "--no_java"]
    scored += ["--output_dir", str(tmp_path / "eval")]
    with pytest.raises(FormatError, match="precision='int8' but the model was trained on 'f"):
        evaluate_run(scored)
    assert "CIDEr" in evaluate_run([*scored, "--any_precision"])["metrics"]

    with pytest.raises(UsageError, match="int8 runs on --runtime openvino only"):
        build_encoder("none", "int8", None, "tensorflow", str(cal))
    with pytest.raises(UsageError, match="needs --calibration"):
        build_encoder("none", "int8", None, "openvino")
    with pytest.raises(UsageError, match="calibrated for weights none"):
        build_encoder("imagenet", "int8", None, "openvino", str(cal))
