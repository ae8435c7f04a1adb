"""The caption table's promises under faults: kills at several moments, resumes, two runs at
once, refused commands, transient failures tried again, maintenance; each on a local folder
and on gs:// (the emulator, `tests.gcs`)."""

import json
import os

import pyarrow.parquet as pq
import pytest

from beam_jobs.caption_images import run
from model.cli import UsageError
from tests.conftest import GCS_BUCKET
from tests.fixtures import write_tiny_export
from tests.helpers import encode, noise, solid
from tests.tables import Where, caption_rows, last_run, table_uris

RUNNER = ["--runner", "FnApiRunner"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_tiny_export(str(tmp_path_factory.mktemp("export") / "export"))


def tables(out):
    return caption_rows(out)


@pytest.fixture
def local(tmp_path):
    """A caption table in a local folder (for the tests whose gs:// path another covers)."""
    return Where(str(tmp_path / "table"))


@pytest.fixture(params=["local", "gcs"])
def where(request, tmp_path):
    """Where a test's caption table lives: a local folder, or gs:// on the emulator."""
    if request.param == "local":
        return Where(str(tmp_path / "table"))
    env = request.getfixturevalue("gcs")
    return Where(f"gs://{GCS_BUCKET}/{tmp_path.name}/table", env)


def test_skip_existing_captions_only_new_inputs(export, tmp_path, where):
    out = str(where)
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(encode(noise(20), "JPEG"))
    base = ["--model", export, "--input", str(folder), "--output_dir", out, *RUNNER]
    run(base)
    (folder / "two.jpg").write_bytes(encode(noise(21), "JPEG"))
    (folder / "three.png").write_bytes(encode(noise(22), "PNG"))
    summary = run([*base, "--skip_existing"])
    assert summary["captioned"] == 2
    caps, errs = tables(out)
    assert sorted(os.path.basename(r["uri"]) for r in caps) == ["one.jpg", "three.png", "two.jpg"]
    assert last_run(out)["looping"]["images"] == 2  # this run's rows; the table sums them
    for _ in range(2):  # a finished table: nothing new, however often
        again = run([*base, "--skip_existing"])
        assert (again["captioned"], again["failed"]) == (0, 0)
    assert len(table_uris(out)) == 3 and not where.records()
    (folder / "four.jpg").write_bytes(encode(noise(23), "JPEG"))
    version = where.version()
    with pytest.raises(UsageError, match="holds captions with beam_size 1; this run has beam_s"):
        run([*base, "--skip_existing", "--beam_size", "3"])
    assert where.version() == version and len(table_uris(out)) == 3


def test_a_model_batch_that_raises_becomes_one_error_row_per_image(
    export, tmp_path, monkeypatch, where
):
    """Fault injection: the model raises on any batch holding an all-white image."""
    from beam_jobs import inference

    out = str(where)
    original = inference.CaptionerHandler.run_inference

    def flaky(self, batch, model, inference_args=None):
        if any(int(pixels.min()) == 255 for pixels in batch):
            raise RuntimeError("out of memory on the accelerator")
        return original(self, batch, model, inference_args)

    monkeypatch.setattr(inference.CaptionerHandler, "run_inference", flaky)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(encode(noise(70 + i), "JPEG"))
    (folder / "white.png").write_bytes(encode(solid((255, 255, 255)), "PNG"))
    summary = run(
        ["--model", export, "--input", str(folder), "--output_dir", out]
        + ["--batch_size", "1", *RUNNER]
    )
    caps, errs = tables(out)
    assert sorted(os.path.basename(r["uri"]) for r in caps) == ["0.jpg", "1.jpg", "2.jpg"]
    assert [(os.path.basename(e["uri"]), e["error_type"]) for e in errs] == [
        ("white.png", "inference_error")
    ]
    assert "out of memory on the accelerator" in errs[0]["message"]
    assert summary["errors"] == {"inference_error": 1}

    # The fault is gone: --skip_existing tries the transient failure again, and its old
    # error row goes; a file that is not an image is not read again.
    monkeypatch.undo()
    (folder / "text.jpg").write_bytes(b"not an image")
    skip = ["--model", export, "--input", str(folder), "--output_dir", out]
    skip += ["--skip_existing", *RUNNER]
    again = run(skip)
    assert (again["captioned"], again["errors"]) == (1, {"not_an_image": 1})
    caps, errs = tables(out)
    assert len(caps) == 4 and [os.path.basename(e["uri"]) for e in errs] == ["text.jpg"]
    counts = last_run(out)["counts"]
    assert (counts["captioned"], counts["failed"], counts["superseded"]) == (1, 1, 1)
    third = run(skip)  # nothing transient left: nothing is read again
    assert (third["captioned"], third["failed"]) == (0, 0)


def _table_uris(out):
    return table_uris(out)


def _kill_when(cmd, ready, env=None, timeout=300, finished_ok=False):
    """Starts `cmd` and SIGKILLs it once `ready()` is true; returns whether it did. With
    `finished_ok`, a command that ends well before `ready()` was seen true (a moment shorter
    than a poll on a loaded machine) returns False instead of failing."""
    import subprocess
    import time

    from tests.test_cli import ENV, ROOT

    proc = subprocess.Popen(
        cmd, env={**ENV, **(env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while not ready():
        if finished_ok and proc.poll() == 0 and not ready():
            return False
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return True


def _images(folder, count, seed):
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes(encode(noise(seed + i), "JPEG"))
    return sorted(str(p) for p in folder.iterdir())


def test_killed_runs_leave_the_table_whole_and_resume_from_their_files(
    export, tmp_path, capsys, where
):
    """SIGKILL a first run once it has finished files: the same command with
    --skip_existing adopts them and captions only the rest. Then SIGKILL reruns that
    replace the table 2 and 7 s in (loading, reading) and once files exist: the table
    stays whole each time, and the resumed rerun replaces it."""
    import subprocess
    import sys
    import time

    from tests.test_cli import ENV, ROOT

    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 16, 200)
    (folder / "broken.jpg").write_bytes(b"not an image")
    argv = ["--model", export, "--input", str(folder), "--output_dir", out]
    argv += ["--batch_size", "2", "--checkpoint_seconds", "0", *RUNNER]
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv]
    expected = sorted([str(p) for p in folder.iterdir()])

    _kill_when(cmd, lambda: len(where.parts()) >= 4, where.env)
    assert where.version() is None  # no commit: no table
    killed = where.parts()
    kept = where.rows_in(killed)
    assert kept >= 4
    resumed = run([*argv, "--skip_existing"])
    assert f"{len(killed)} finished file(s), {kept} rows kept" in capsys.readouterr().out
    assert resumed["captioned"] + resumed["failed"] == len(expected) - kept
    assert sorted(_table_uris(out)) == expected
    assert last_run(out)["counts"]["resumed"] == kept

    version = where.version()
    for delay in (2, 7) if not where.env else ():  # killed loading, reading (local: the same code)
        proc = subprocess.Popen(
            cmd,
            env={**ENV, **where.env},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.kill()
        proc.wait()
        assert sorted(_table_uris(out)) == expected, f"killed after {delay}s"
        if not finished:
            assert where.version() == version
    before = where.parts()
    _kill_when(cmd, lambda: len(where.parts() - before) >= 4, where.env)
    assert sorted(_table_uris(out)) == expected
    killed = where.parts() - before
    resumed = run([*argv, "--skip_existing"])
    assert resumed["captioned"] + resumed["failed"] == len(expected) - where.rows_in(killed)
    assert sorted(_table_uris(out)) == expected
    assert last_run(out)["mode"] == "replace"  # resumed as the replacing run it was


@pytest.mark.parametrize("moment", ["record", "commit"])
def test_a_run_killed_after_its_pipeline_is_committed_by_its_resume(
    export, tmp_path, moment, where
):
    if moment == "commit" and where.env:
        pytest.skip("gs://: the record moment, and --skip_existing after a commit, cover it")
    """--num_shards 2, SIGKILLed once its pipeline has finished (its run record is
    written), or once its commit is in the log: the same command with --skip_existing
    ends with every input once, the killed run's files adopted rather than replaced."""
    import sys

    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 12, 500)
    argv = ["--model", export, "--input", str(folder), "--output_dir", out]
    argv += ["--batch_size", "4", "--num_shards", "2", *RUNNER]
    run(argv)  # a table to add to
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv, "--skip_existing"]
    for attempt in range(3):  # the record lives until the commit: a poll may miss it
        new = folder / f"new{attempt}.jpg"
        new.write_bytes(encode(noise(520 + attempt), "JPEG"))
        version = where.version()
        ready = where.records if moment == "record" else lambda v=version: where.version() != v
        if _kill_when(cmd, ready, where.env, finished_ok=True):
            break
    else:
        pytest.fail("each run committed before its run record was seen: nothing was killed")
    assert sorted(_table_uris(out)) in (
        sorted(str(p) for p in folder.iterdir() if p != new),
        sorted(str(p) for p in folder.iterdir()),
    )
    again = run([*argv, "--skip_existing"])
    assert again["captioned"] == 0
    assert sorted(_table_uris(out)) == sorted(str(p) for p in folder.iterdir())


def test_two_runs_on_one_table_at_once_each_input_once(export, tmp_path, where):
    """A second run started while the first runs, both adding overlapping inputs to one
    table: one commits, the other fails in one line and commits nothing; the table holds
    every input once, and the loser's command, run again, adds what is left."""
    import subprocess
    import sys
    import time

    from tests.test_cli import ENV, ROOT

    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 16, 300)
    base = ["--model", export, "--output_dir", out, "--batch_size", "2", *RUNNER]
    run([*base, "--input", str(folder / "00.jpg")])
    argv = [*base, "--input", str(folder), "--skip_existing"]
    first = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.caption_images", *argv],
        env={**ENV, **where.env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    committed = where.parts()
    deadline = time.time() + 120
    while not where.parts() - committed and time.time() < deadline:
        time.sleep(0.05)  # the first run is captioning
    try:
        run(argv)
        second = "committed"
    except UsageError as e:
        second = str(e)
    code = first.wait(timeout=300)
    stderr = first.stderr.read().decode()
    assert (code == 0) != (second == "committed"), (code, second, stderr[-2000:])
    loser = stderr.strip().splitlines()[-1] if code else second
    assert "another run committed to this table while this one ran" in loser
    uris = _table_uris(out)
    assert len(uris) == len(set(uris)) == 16
    again = run(argv)
    assert again["captioned"] == 0 and len(_table_uris(out)) == 16


def test_a_refused_command_keeps_a_killed_runs_files(export, tmp_path, local):
    where = local
    """A killed --skip_existing run's files survive a command that is then refused
    (another decoding), and the resume adopts them."""
    import sys

    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 20, 700)
    base = ["--model", export, "--input", str(folder), "--output_dir", out]
    base += ["--batch_size", "2", "--checkpoint_seconds", "0", *RUNNER]
    run([*base[:2], "--input", str(folder / "00.jpg"), *base[4:]])
    before = where.parts()
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *base, "--skip_existing"]
    _kill_when(cmd, lambda: len(where.parts() - before) >= 3, where.env)
    killed = where.parts() - before
    with pytest.raises(UsageError, match="beam_size 1; this run has beam_size 3"):
        run([*base, "--skip_existing", "--beam_size", "3"])
    assert killed <= where.parts()
    resumed = run([*base, "--skip_existing"])
    assert resumed["captioned"] == 19 - where.rows_in(killed)
    assert sorted(_table_uris(out)) == sorted(str(p) for p in folder.iterdir())


def test_a_flag_typo_is_refused_and_the_table_kept(export, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(noise(600), "JPEG"))
    base = ["--model", export, "--input", str(folder), "--output_dir", str(out), *RUNNER]
    run(base)
    version = Where(str(out)).version()
    for typo, near in (("--skip-existing", "--skip_existing"), ("--beam-size", "--beam_size")):
        with pytest.raises(UsageError, match=f"unknown flag {typo}: did you mean {near}"):
            run([*base, typo] + (["3"] if "size" in typo else []))
    assert Where(str(out)).version() == version
    with pytest.raises(UsageError, match="unknown flag --runer: did you mean --runner"):
        run([*base, "--runer", "DirectRunner"])


def test_an_old_layout_folder_is_refused_in_one_line(export, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "captions", "format_version": 1}')
    (tmp_path / "a.jpg").write_bytes(encode(noise(800), "JPEG"))
    with pytest.raises(UsageError, match="old layout.*python -m beam_jobs.caption_table convert"):
        run(["--model", export, "--input", str(tmp_path / "a.jpg"), "--output_dir", str(out)])


def test_maintenance_convert_compact_vacuum_history(export, tmp_path, local, capsys):
    where = local
    """An old-layout folder converted in place; compaction changes no row and joins the
    small files; vacuum deletes what no recent version reads (replaced and compacted
    files, a killed run's orphans) and nothing a version reads."""
    import pyarrow as pa

    from beam_jobs import caption_table
    from beam_jobs.caption_table import main as table_command

    old = tmp_path / "old"
    old.mkdir()
    captions = pa.table(
        {
            "uri": ["/x/a.jpg"],
            "caption": ["a red circle"],
            "token_ids": [[4, 5, 6]],
            "log_prob": [-1.5],
            "length": [3],
            "hit_max_length": [False],
            "width": [4],
            "height": [4],
            "sha256": ["0" * 64],
            "model_id": ["m1"],
        }
    )
    errors = pa.table({"uri": ["/x/b.jpg"], "error_type": ["corrupt"], "message": ["bad"]})
    pq.write_table(captions, old / "captions-r1-0.parquet")
    pq.write_table(errors, old / "errors-r1-0.parquet")
    (old / "stale-captions-r0.parquet").write_bytes(b"not listed")
    (old / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "captions",
                "format_version": 1,
                "run_id": "r1",
                "model_id": "m1",
                "files": ["captions-r1-0.parquet", "errors-r1-0.parquet"],
                "decoding": {
                    "beam_size": 3,
                    "length_penalty": 0.0,
                    "block_repeats": 3,
                    "allow_unk": False,
                },
            }
        )
    )
    table_command(["convert", str(old)])
    assert "converted 2 rows" in capsys.readouterr().out
    caps, errs = tables(old)
    assert [(r["uri"], r["caption"], r["beam_size"], r["key"]) for r in caps] == [
        ("/x/a.jpg", "a red circle", 3, "/x/a.jpg")
    ]
    assert [(r["uri"], r["error_type"], r["model_id"]) for r in errs] == [
        ("/x/b.jpg", "corrupt", "m1")
    ]
    assert not (old / "manifest.json").exists() and not (old / "captions-r1-0.parquet").exists()

    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 6, 900)
    base = ["--model", export, "--output_dir", out, "--batch_size", "2", *RUNNER]
    for i in range(3):  # three appends of two images: at least three small files
        args = [*base, "--input", str(folder / f"{2 * i:02d}.jpg")]
        run([*args, "--input", str(folder / f"{2 * i + 1:02d}.jpg"), "--skip_existing"])
    orphan = f"{out}/part-0123456789ab-v9-a000000-0.parquet"  # as a killed run leaves one
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(orphan) as f:
        f.write(b"PAR1")
    rows = sorted(table_uris(out))
    files = len(caption_table.data_files(caption_table.open_table(out)))
    assert files >= 3
    table_command(["compact", out])
    assert len(caption_table.data_files(caption_table.open_table(out))) == 1
    assert sorted(table_uris(out)) == rows
    table_command(["vacuum", out, "--retention_hours", "0", "--dry_run"])
    assert where.parts() >= {orphan.rsplit("/", 1)[1]}
    table_command(["vacuum", out, "--retention_hours", "0"])
    live = {p.rsplit("/", 1)[1] for p in caption_table.data_files(caption_table.open_table(out))}
    assert where.parts() == live and sorted(table_uris(out)) == rows
    table_command(["history", out])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("v2 append") and "captioned 2" in line for line in lines)
    # A run compacts by itself past --compact_above small files.
    (folder / "new.jpg").write_bytes(encode(noise(950), "JPEG"))
    summary = run([*base, "--input", str(folder), "--skip_existing", "--compact_above", "1"])
    assert summary["captioned"] == 1 and "compacted 2 small files into 1" in capsys.readouterr().out
    assert len(caption_table.data_files(caption_table.open_table(out))) == 1
    assert sorted(table_uris(out)) == sorted([*rows, str(folder / "new.jpg")])


def test_a_killed_retry_of_transient_failures_resumes_with_each_input_once(
    export, tmp_path, monkeypatch
):
    """Every image failed transiently (the model raised); the --skip_existing run that
    tries them again is SIGKILLed once it has saved files, and its resume adopts them:
    each input ends with one row, its caption, and no error row is left."""
    import sys

    from beam_jobs import inference

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(encode(solid((255, 255, 255), (40 + i, 30)), "PNG"))
    original = inference.CaptionerHandler.run_inference

    def broken(self, batch, model, inference_args=None):
        raise RuntimeError("out of memory on the accelerator")

    monkeypatch.setattr(inference.CaptionerHandler, "run_inference", broken)
    argv = ["--model", export, "--input", str(folder), "--output_dir", str(out)]
    argv += ["--batch_size", "2", "--checkpoint_seconds", "0", *RUNNER]
    assert run(argv)["errors"] == {"inference_error": 12}
    monkeypatch.setattr(inference.CaptionerHandler, "run_inference", original)
    where = Where(str(out))
    before = where.parts()
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv, "--skip_existing"]
    _kill_when(cmd, lambda: len(where.parts() - before) >= 2)
    run([*argv, "--skip_existing"])
    caps, errs = tables(out)
    assert sorted(r["uri"] for r in caps) == sorted(str(p) for p in folder.iterdir())
    assert errs == []
