"""Live progress of the Beam jobs: the line, the tallies, and real runs that print it."""

import re

import pytest

from beam_jobs.caption_images import run as caption_run
from beam_jobs.extract_features import run as extract_run
from beam_jobs.progress import ProgressLine, Tally, format_duration, read_tallies
from demo.make_shapes import make_split
from tests.fixtures import write_tiny_export
from tests.helpers import encode, noise

RUNNER = ["--runner", "FnApiRunner"]


def test_the_line_says_done_of_total_rates_errors_and_time_left():
    line = ProgressLine(
        "caption_images", 120, 360, "images", 14.25, 12.0, {"too_large": 1, "not_an_image": 2}
    )
    assert str(line) == (
        "caption_images: 120/360 (33%) | 14.2 images/s now, 12.0 overall"
        " | 3 errors (not_an_image 2, too_large 1) | 0:20 left"
    )
    assert str(ProgressLine("x", 0, 0, "images", 0, 0)).endswith(
        "0 done | 0.0 images/s now, 0.0 overall | 0 errors | --:-- left"
    )
    assert str(ProgressLine("x", 5, 5, "images", 1, 1, {"missing_file": 1})).endswith(
        "1 error (missing_file 1) | finishing"
    )


@pytest.mark.parametrize(
    "seconds, text", [(0, "0:00"), (59.6, "1:00"), (61, "1:01"), (3600 * 27 + 5, "27:00:05")]
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_tallies_of_several_dofns_add_up(tmp_path):
    tallies = [Tally("ns", str(tmp_path)) for _ in range(3)]
    for i, t in enumerate(tallies):
        t.setup()
        for _ in range(i + 1):
            t.inc("images_captioned")
        t.inc("error.not_an_image", 2)
        t.flush()
    assert read_tallies(str(tmp_path)) == {"images_captioned": 6, "error.not_an_image": 6}
    remote = Tally("ns", str(tmp_path / "on-another-machine"))
    remote.setup()
    remote.inc("images_captioned")  # only a Beam counter there; no file, no error
    remote.flush()
    assert read_tallies(str(tmp_path))["images_captioned"] == 6


PROGRESS = re.compile(r"^(\w+): (\d+)/(\d+) \(\d+%\) \| [\d.]+ images/s now", re.MULTILINE)


def _progress(stderr: str, job: str) -> list[tuple[int, int]]:
    return [(int(d), int(t)) for j, d, t in PROGRESS.findall(stderr) if j == job]


def test_a_caption_run_prints_progress_lines_with_rising_counts(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        (images / f"{i:02d}.jpg").write_bytes(encode(noise(i), "JPEG"))
    (images / "broken.jpg").write_bytes(b"not an image")
    export = write_tiny_export(str(tmp_path / "export"))
    summary = caption_run(
        ["--model", export, "--input", str(images), "--output_dir", str(tmp_path / "out")]
        + ["--batch_size", "2", "--progress_seconds", "0.5", *RUNNER]
    )
    assert summary["captioned"] == 24 and summary["errors"] == {"not_an_image": 1}
    lines = _progress(capsys.readouterr().err, "caption_images")
    dones = [d for d, _ in lines]
    assert len(set(dones)) >= 2, lines  # at least two lines with rising counts
    assert dones == sorted(dones)
    assert all(total == 25 for _, total in lines if total and _ > 0)


def test_an_extract_run_prints_progress_against_the_annotated_images(tmp_path, capsys):
    ann = make_split(str(tmp_path), "train", 24, seed=3)
    summary = extract_run(
        ["--split", "train", "--captions_json", ann, "--images_dir", str(tmp_path / "train")]
        + ["--output_dir", str(tmp_path / "f"), "--weights", "none", "--batch_size", "2"]
        + ["--progress_seconds", "0.5", *RUNNER]
    )
    assert summary["embedded"] == 24 and summary["errors"] == {}
    lines = _progress(capsys.readouterr().err, "extract_features")
    assert lines and {total for _, total in lines} == {24}
    dones = [d for d, _ in lines]
    assert dones == sorted(dones) and len(set(dones)) >= 2, lines


def test_no_progress_lines_when_turned_off_and_no_line_that_says_nothing_new():
    """--progress_seconds 0 starts no reporter at all (a job faster than the interval
    would pass a weaker test). A log gets a line when something moved: an unchanged
    line is not repeated every interval (only as a heartbeat, every minute)."""
    import io
    import time

    from beam_jobs.progress import ProgressReporter

    for interval, expected in ((0, 0), (0.05, 1)):
        stream = io.StringIO()
        with ProgressReporter("x", "ns", ["done"], interval, total=5, stream=stream):
            time.sleep(0.5)  # ten intervals, nothing done
        assert len(stream.getvalue().splitlines()) == expected, stream.getvalue()


def test_a_total_still_rising_is_marked_and_has_no_time_left():
    """While archives are listed the total rises: `0/52+ (still listing)`, no percentage
    or time left that the next line would contradict."""
    line = ProgressLine("x", 0, 52, "images", 0.0, 0.0, growing=True)
    assert (
        str(line)
        == "x: 0/52+ (still listing) | 0.0 images/s now, 0.0 overall | 0 errors | --:-- left"
    )
