"""The command lines as a user meets them: instant argument errors, quiet start-up.

Each command runs as a real subprocess. `python -X importtime` lists every
module imported before the process ended, so "answered before TensorFlow (or
Beam) was imported" is checked directly instead of timed.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.fixtures import write_features_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No TF_CPP_MIN_LOG_LEVEL: the commands must be quiet on their own.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    "PYTHONPATH": ROOT,
}
HEAVY = re.compile(r"\|\s+(tensorflow|keras|apache_beam)$", re.MULTILINE)


def command(module: str, *args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", module, *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )


def own_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("model.train", ["--data_dir", "/no/such/dir", "--model_dir", "m"], "error: --data_dir"),
        (
            "model.train",
            ["--data_dir", ".", "--model_dir", "m", "--batch_size", "0"],
            "--batch_size",
        ),
        ("model.train", ["--data_dir", ".", "--model_dir", "m", "--preset", "huge"], "--preset"),
        ("model.evaluate", ["--model", "/no/such/export", "--data_dir", "."], "error: --model"),
        (
            "model.evaluate",
            ["--model", ".", "--data_dir", ".", "--batch_size", "-5"],
            "--batch_size",
        ),
        (
            "beam_jobs.caption_images",
            ["--model", ".", "--input", "/no/such/*.jpg", "--output_dir", "o"],
            "error: --input matches nothing",
        ),
        (
            "beam_jobs.caption_images",
            ["--model", ".", "--input", ".", "--output_dir", "o", "--num_shards", "x"],
            "--num_shards",
        ),
        (
            "beam_jobs.extract_features",
            ["--captions_json", "/no/such.json", "--split", "train"]
            + ["--images_dir", ".", "--output_dir", "o"],
            "error: --captions_json does not exist",
        ),
        (
            "beam_jobs.extract_features",
            ["--captions_json", "x.json", "--images_dir", ".", "--output_dir", "o"],
            "error: --split is required",
        ),
        (
            "beam_jobs.extract_features",
            ["--karpathy_json", "x.json", "--images_dir", ".", "--output_dir", "o"]
            + ["--vocab_size", "3"],
            "--vocab_size",
        ),
    ],
)
def test_argument_errors_answer_before_tensorflow_or_beam_is_imported(module, args, message):
    r = command(module, *args, importtime=True)
    lines = own_lines(r.stderr)
    assert r.returncode in (1, 2), r.stderr[-2000:]
    assert message in lines[-1], lines[-5:]
    assert not HEAVY.findall(r.stderr), f"{module} imported {HEAVY.findall(r.stderr)} first"


def test_a_command_that_loads_tensorflow_prints_only_its_own_lines(tmp_path):
    """On a CPU machine TensorFlow's start-up (absl pre-init notice, cuda stubs,
    cuInit at error level, cpu_feature_guard) is filtered; --verbose 3 keeps it."""
    os.makedirs(tmp_path / "f")  # exists, but is not a features dir: fails after TF loads
    quiet = command("model.train", "--data_dir", str(tmp_path / "f"), "--model_dir", "m")
    assert quiet.returncode == 1
    assert [line for line in quiet.stderr.splitlines() if line.strip()] == [
        quiet.stderr.strip().splitlines()[-1]
    ], quiet.stderr
    assert quiet.stderr.strip().startswith("error: ")
    loud = command(
        "model.train", "--data_dir", str(tmp_path / "f"), "--model_dir", "m", "--verbose", "3"
    )
    assert len(loud.stderr.strip().splitlines()) > 1  # TensorFlow's own lines, unfiltered


def test_training_output_is_our_lines_only(tmp_path):
    """Nothing but our lines and the progress bar, whose last loss is the epoch line's;
    the serving export at the end is as quiet."""
    write_features_dir(str(tmp_path / "f"), {"train": 8, "val": 4})
    r = command(
        "model.train",
        *("--data_dir", str(tmp_path / "f"), "--model_dir", str(tmp_path / "m")),
        *("--epochs", "2", "--preset", "tiny", "--batch_size", "4", "--verbose", "1"),
        *("--steps_per_execution", "1"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert all(line.startswith("train: ") or "━" in line for line in lines), r.stdout
    assert "train: serving SavedModel in" in r.stdout
    checked, bar = 0, None
    for line in lines:
        if "━" in line:
            bar = line
        elif line.startswith("train: epoch "):  # the bar's last state just before it
            bar_loss = float(re.search(r" - loss: ([-\d.e]+)", bar).group(1))
            assert f" loss {bar_loss:.4f} " in line, (bar, line)
            checked += 1
    assert checked == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"images": [', "not valid JSON"),
        ("[1, 2, 3]", "not a COCO captions file"),
        ('{"images": [{"id": 1}], "annotations": []}', "lacks the field 'file_name'"),
        ('{"images": [{"id": "x", "file_name": "a.jpg"}], "annotations": []}', "invalid literal"),
        ('{"images": [], "annotations": [{"caption": "a"}]}', "lacks the field 'image_id'"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
)
def test_a_malformed_annotation_file_is_one_line(tmp_path, content, message):
    """In this process, through the command's own `main` (one subprocess case below)."""
    from beam_jobs.extract_features import main

    ann = tmp_path / "captions.json"
    ann.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--captions_json", str(ann), "--split", "train", "--images_dir", str(tmp_path)]
            + ["--output_dir", str(tmp_path / "f"), "--weights", "none"]
        )
    text = str(exit_.value.code)
    assert text.startswith(f"error: {ann}: ") and message in text and "\n" not in text


def test_a_malformed_annotation_file_through_the_command(tmp_path):
    ann = tmp_path / "captions.json"
    ann.write_text('{"images": [')
    r = command(
        "beam_jobs.extract_features",
        *("--captions_json", str(ann), "--split", "train", "--images_dir", str(tmp_path)),
        *("--output_dir", str(tmp_path / "f"), "--weights", "none"),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: {ann}: not valid JSON")


@pytest.mark.parametrize("content", ["[]", '"manifest"', "{"])
def test_a_manifest_that_is_not_an_object_is_one_line(tmp_path, content):
    from model.train import main

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "manifest.json").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["--data_dir", str(tmp_path / "f"), "--model_dir", str(tmp_path / "m")])
    text = str(exit_.value.code)
    assert text.startswith("error: ") and "manifest" in text and "\n" not in text


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root only; skipped elsewhere): even root cannot write to it."""
    from tests.helpers import tmpfs

    with tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


@pytest.mark.parametrize(
    "module, args, flag",
    [
        ("beam_jobs.caption_images", ["--model", ".", "--input", "."], "--output_dir"),
        (
            "beam_jobs.extract_features",
            ["--captions_json", "setup.py", "--split", "train", "--images_dir", "."],
            "--output_dir",
        ),
        ("model.train", ["--data_dir", "."], "--model_dir"),
    ],
)
def test_an_output_folder_that_cannot_be_written_is_one_line(module, args, flag, read_only_dir):
    r = command(module, *args, flag, str(read_only_dir / "out"))
    lines = own_lines(r.stderr)
    assert r.returncode in (1, 2), r.stderr[-2000:]
    assert (
        lines[-1] == f"error: {flag} {read_only_dir}/out cannot be written: Read-only file system"
    )
    assert "Traceback" not in r.stderr
