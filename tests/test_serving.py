"""The serving SavedModel: built by its command for an existing export, same captions
as caption_images on every image format the job accepts."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from beam_jobs.caption_images import run as caption_run
from model.serving import run as serving_run
from tests.fixtures import write_tiny_export
from tests.helpers import encode, good_images, noise
from tests.tables import caption_rows
from tests.test_cli import ENV, ROOT

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
    rows, _ = caption_rows(root / "captions")
    bulk = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    fn = tf.saved_model.load(path).signatures["serving_default"]
    names = sorted(files)
    out = fn(images=tf.constant([files[n] for n in names]))
    return path, names, {k: v.numpy() for k, v in out.items()}, bulk, images, export


def test_the_command_writes_export_serving(served):
    path, *_ = served
    assert path.endswith("/export/serving")
    loaded = tf.saved_model.load(path)
    spec = loaded.signatures["serving_default"].structured_input_signature[1]
    assert list(spec) == ["images"] and spec["images"].dtype == tf.string
    assert spec["images"].shape.as_list() == [None]


def test_served_captions_equal_the_bulk_job_on_every_format(served):
    _, names, out, bulk, *_ = served
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


def test_a_bad_image_is_its_own_error_not_the_requests(served, tmp_path):
    """A decompression bomb is refused from its header (no 400 MP buffer), a TIFF is not
    decoded, a broken file fails alone; the good image beside them keeps its caption."""
    import io

    from PIL import Image

    path, names, out, *_ = served
    fn = tf.saved_model.load(path).signatures["serving_default"]
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 1.2 MB of PNG, 400 MP decoded
    tiff = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tiff, "TIFF")
    rgb = open(os.path.join(served[4], "rgb.jpg"), "rb").read()
    images = [rgb, bomb.getvalue(), b"not an image", tiff.getvalue(), b"", rgb]
    got = {k: v.numpy() for k, v in fn(images=tf.constant(images)).items()}
    errors = [e.decode() for e in got["error"]]
    assert errors == ["", "decompression_bomb", "not_an_image", "unsupported_format"] + [
        "empty",
        "",
    ]
    expected = out["caption"][names.index("rgb.jpg")]
    assert list(got["caption"]) == [expected, b"", b"", b"", b"", expected]
    assert (got["width"][1], got["height"][1]) == (0, 0)
    # Every image bad: still one answer per image.
    alone = fn(images=tf.constant([b"x", b"y"]))
    assert [e.decode() for e in alone["error"].numpy()] == ["not_an_image"] * 2


def test_a_failed_image_has_an_error_and_no_caption_and_errors_name_the_cause(served):
    """A failed image's row holds its error only: no log-probability, length, tokens or
    attention of the blank image it became. Error kinds are the Beam jobs' (a cut JPEG
    is `truncated`, an empty file `empty`). An empty request gets empty outputs."""
    path, names, *_ = served
    fn = tf.saved_model.load(path).signatures["serving_default"]
    rgb = open(os.path.join(served[4], "rgb.jpg"), "rb").read()
    png = open(os.path.join(served[4], "large.png"), "rb").read()
    images = [rgb, rgb[: len(rgb) // 2], png[: len(png) // 2], b"", b"text" * 10]
    got = {k: v.numpy() for k, v in fn(images=tf.constant(images)).items()}
    assert [e.decode() for e in got["error"]] == [
        "",
        "truncated",
        "truncated",
        "empty",
        "not_an_image",
    ]
    assert got["length"][0] > 0 and got["log_prob"][0] < 0
    for key in ("length", "log_prob", "token_ids", "attention", "hit_max_length"):
        assert not got[key][1:].any(), key
    assert list(got["caption"][1:]) == [b""] * 4
    empty = {k: v.numpy() for k, v in fn(images=tf.constant([], tf.string)).items()}
    assert set(empty) == set(got)
    for key, value in empty.items():
        assert value.shape == (0, *got[key].shape[1:]), key


def test_model_caption_prints_one_line_per_file_in_order(served, tmp_path):
    *_, bulk, images, export = served
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    files = [images / "rgb.jpg", tmp_path / "missing.png", images / "webp.webp"]
    files += [tmp_path / "broken.jpg", images / "photo_640.jpg"]
    os.mkfifo(tmp_path / "pipe.jpg")  # no writer: a read would block forever
    (tmp_path / "adir.jpg").mkdir()
    files += [tmp_path / "pipe.jpg", tmp_path / "adir.jpg", images / "gray.png"]
    r = subprocess.run(
        [sys.executable, "-m", "model.caption", "--model", export, *map(str, files)]
        + ["--plots", str(tmp_path / "plots")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 1  # four files failed
    assert r.stderr == ""
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert [p for p, _ in lines] == list(map(str, files))
    for path, text in lines:
        name = os.path.basename(path)
        if name in bulk:
            assert text == bulk[name]["caption"]
    assert lines[1][1].startswith("error: missing_file")
    assert lines[3][1].startswith("error: not_an_image")
    assert lines[5][1] == "error: not_a_file: not a regular file (a FIFO, device or socket)"
    assert lines[6][1] == "error: not_a_file: a folder, not an image file"
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


def test_model_caption_fetches_http_urls_as_the_bulk_job_does(served, tmp_path):
    """An http(s) IMAGE is fetched as the Beam job fetches a table's URLs (retries, error
    kinds, the project's User-Agent): the same caption as the file, one error line for a
    URL that cannot be had, and its attention plot."""
    *_, bulk, images, export = served
    from model.caption import run
    from tests.http_faults import FaultServer

    jpeg = (images / "photo_640.jpg").read_bytes()
    with FaultServer({"a.jpg": jpeg}) as server:
        urls = [server.url("flaky/a.jpg"), server.url("status/404"), server.url("html/a.jpg")]
        rows = run(
            ["--model", export, *urls, str(images / "rgb.jpg")]
            + ["--plots", str(tmp_path / "plots"), "--fetch_retries", "1"]
        )
        agents = set(server.agents)
    assert [row["path"] for row in rows] == [*urls, str(images / "rgb.jpg")]
    assert rows[0]["caption"] == bulk["photo_640.jpg"]["caption"]
    assert (rows[0]["width"], rows[0]["height"]) == (640, 480)
    assert rows[1]["error_type"] == "http_404"
    assert rows[2]["error_type"] == "not_an_image"
    assert rows[3]["caption"] == bulk["rgb.jpg"]["caption"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2
    assert len(agents) == 1 and agents.pop().startswith("show-attend-tell")


def test_model_caption_beam_search_equals_the_bulk_jobs(served, tmp_path):
    """Beam search through model.caption gives caption_images' beam-search captions."""
    *_, images, export = served
    from model.caption import run

    names = ["rgb.jpg", "gray.png", "photo_640.jpg"]
    caption_run(
        ["--model", export, "--input", str(images), "--output_dir", str(tmp_path / "beam")]
        + ["--beam_size", "3", "--runner", "FnApiRunner", "--progress_seconds", "0"]
    )
    rows, _ = caption_rows(tmp_path / "beam")
    bulk = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    got = run(["--model", export, *(str(images / n) for n in names), "--beam_size", "3"])
    for name, row in zip(names, got, strict=True):
        assert row["caption"] == bulk[name]["caption"], name
        assert row["log_prob"] == pytest.approx(bulk[name]["log_prob"], abs=1e-4), name


def test_the_graph_decodes_every_format_as_pil_does_within_one_level():
    """The served pixels themselves, not captions of a model that barely looks: the
    graph's decoding equals model.images.preprocess within one level on every format."""
    import numpy as np
    from PIL import Image

    from model.images.preprocess import IMAGE_SIZE, decode_bounded, preprocess_image

    def smooth(seed: int, size=(320, 240)) -> Image.Image:  # photo-like: resizing matters
        return noise(seed, (size[0] // 16, size[1] // 16)).resize(size, Image.BICUBIC)

    rgba = smooth(3).convert("RGBA")
    rgba.putalpha(smooth(4).convert("L"))
    files = {
        "rgb.jpg": encode(smooth(1), "JPEG", quality=90),
        "photo_1280.jpg": encode(smooth(5, (1280, 960)), "JPEG"),  # decoded at 1/4 scale
        "photo_640.jpg": encode(smooth(6, (640, 480)), "JPEG"),  # at 1/2 scale
        "gray.png": encode(smooth(2).convert("L"), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(smooth(7).convert("P"), "PNG"),
        "cmyk.jpg": encode(smooth(8).convert("CMYK"), "JPEG", quality=95),
        "animated.gif": encode(smooth(9).convert("P"), "GIF"),
        "bitmap.bmp": encode(smooth(10), "BMP"),
        "webp.webp": encode(smooth(11), "WEBP", lossless=True),
    }
    names = sorted(files)
    pixels, width, height, error = decode_bounded(
        tf.constant([files[n] for n in names]), IMAGE_SIZE, 10**8, 10**8
    )
    for i, name in enumerate(names):
        want = preprocess_image(files[name])
        assert error[i].numpy() == b"", name
        assert (int(width[i]), int(height[i])) == (want.width, want.height), name
        diff = np.abs(pixels[i].numpy().astype(int) - want.pixels.astype(int))
        assert diff.max() <= 1, (name, int(diff.max()))
        assert np.std(want.pixels) > 5  # a real picture, not a flat one both sides agree on
