import io
import json
import os
import tarfile
import zipfile

import pyarrow.parquet as pq
import pytest

from beam_jobs.caption_images import run
from model.cli import UsageError
from model.io.formats import FormatError
from model.text.ngrams import has_repeated_ngram
from model.text.vocab import Vocabulary
from tests.conftest import GCS_BUCKET
from tests.fixtures import write_tiny_export
from tests.helpers import bad_images, encode, good_images, noise, solid
from tests.tables import Where, caption_rows, duckdb_delta, last_run, table_uris

RUNNER = ["--runner", "FnApiRunner"]


def _tar(path, mode, members):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        folder = tarfile.TarInfo("subdir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of good and bad images, and tar, tar.gz and zip archives; expected outcome per uri."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "images"
    (folder / "nested").mkdir(parents=True)
    expected = {}
    for name, data in good_images().items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = "ok"
    for name, (data, kind) in bad_images().items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = kind
    odd = folder / "nested" / "photo of a café — ünïcode.JPG"
    odd.write_bytes(encode(noise(7), "JPEG"))
    expected[str(odd)] = "ok"
    (folder / "notes.txt").write_text("not matched: not an image extension")
    members = {
        "a.jpg": encode(noise(8), "JPEG"),
        "dir/b.png": encode(noise(9), "PNG"),
        "../evil.jpg": encode(noise(10), "JPEG"),
        "/abs.jpg": encode(noise(11), "JPEG"),
        "bad.jpg": b"nope",
    }
    outcome = {
        "a.jpg": "ok",
        "dir/b.png": "ok",
        "../evil.jpg": "unsafe_path",
        "/abs.jpg": "unsafe_path",
        "bad.jpg": "not_an_image",
        "link.jpg": "not_a_file",
        # "subdir", a directory entry, is not an input: no row
    }
    for name, mode in (("batch.tar", "w"), ("batch.tar.gz", "w:gz")):
        _tar(root / name, mode, members)
        expected.update({f"{root / name}!/{m}": k for m, k in outcome.items()})
    with zipfile.ZipFile(root / "batch.zip", "w") as z:
        for m, data in members.items():
            z.writestr(m, data)
        z.writestr("zdir/", b"")
    zip_outcome = {k: v for k, v in outcome.items() if k != "link.jpg"}  # zdir/: no row
    expected.update({f"{root / 'batch.zip'}!/{m}": k for m, k in zip_outcome.items()})
    export = write_tiny_export(str(root / "export"))
    return root, expected, export


def caption(inputs, out, *extra):
    root, _, export = inputs
    args = [
        "--model",
        export,
        "--input",
        str(root / "images"),
        "--input",
        str(root / "batch.tar"),
        "--input",
        str(root / "batch.tar.gz"),
        "--input",
        str(root / "batch.zip"),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        *RUNNER,
        *extra,
    ]
    return run(args)


def tables(out):
    return caption_rows(out)


@pytest.fixture(params=["local", "gcs"])
def where(request, tmp_path):
    """Where a test's caption table lives: a local folder, or gs:// on the emulator."""
    if request.param == "local":
        return Where(str(tmp_path / "table"))
    env = request.getfixturevalue("gcs")
    return Where(f"gs://{GCS_BUCKET}/{tmp_path.name}/table", env)


@pytest.fixture(scope="module")
def captioned(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("captions")
    summary = caption(inputs, out)
    return out, summary


def test_every_input_appears_exactly_once(captioned, inputs):
    out, summary = captioned
    _, expected, _ = inputs
    caps, errs = tables(out)
    uris = [r["uri"] for r in caps] + [r["uri"] for r in errs]
    assert len(uris) == len(set(uris))
    assert set(uris) == set(expected)
    assert {r["uri"] for r in caps} == {u for u, k in expected.items() if k == "ok"}
    assert {r["uri"]: r["error_type"] for r in errs} == {
        u: k for u, k in expected.items() if k != "ok"
    }
    assert all(r["message"] for r in errs)
    run = last_run(out)
    assert run["counts"] == {
        "captioned": len(caps),
        "failed": len(errs),
        "resumed": 0,
        "superseded": 0,
    }
    assert summary["captioned"] == len(caps) and summary["failed"] == len(errs)
    assert run["decoding"]["block_repeats"] == 3 and run["mode"] == "replace"
    assert run["looping"] == {
        "images": len(caps),
        "repeated_trigram": sum(has_repeated_ngram(r["caption"].split()) for r in caps),
        "at_length_limit": sum(r["hit_max_length"] for r in caps),
        "distinct_captions": len({r["caption"] for r in caps}),
    }
    assert {r["run_id"] for r in caps + errs} == {run["run_id"]}


def test_caption_rows_follow_the_schema(captioned, inputs):
    out, _ = captioned
    _, _, export = inputs
    caps, _ = tables(out)
    model_id = json.load(open(os.path.join(export, "manifest.json")))["model_id"]
    vocab = Vocabulary.load(os.path.join(export, "vocab.txt"))
    for r in caps:
        assert r["model_id"] == model_id and len(r["sha256"]) == 64 and r["key"] == r["uri"]
        assert (r["beam_size"], r["block_repeats"], r["precision"]) == (1, 3, "float32")
        assert r["repeated_trigram"] == has_repeated_ngram(r["caption"].split())
        assert r["length"] == len(r["token_ids"]) <= 6
        assert r["hit_max_length"] == (r["length"] == 6)
        assert r["log_prob"] <= 0 and r["width"] > 0 and r["height"] > 0
        assert r["caption"] == " ".join(vocab.tokens[t] for t in r["token_ids"])
        assert not {0, 2, 3} & set(r["token_ids"])  # never <pad>, <start> or <end>
    rotated = next(r for r in caps if r["uri"].endswith("exif_rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (20, 40)
    assert (
        pq.ParquetFile(next(out.glob("part-*.parquet"))).metadata.row_group(0).column(0).compression
        == "ZSTD"
    )


def test_duckdb_pandas_and_polars_read_the_table(captioned):
    """The table as its users read it: DuckDB's delta extension (loaded offline from its
    PyPI package), pandas through deltalake, polars; all see the same rows."""
    import polars as pl
    from deltalake import DeltaTable

    out, _ = captioned
    con = duckdb_delta()
    [(n, failed)] = con.sql(
        f"select count(*), count(error_type) from delta_scan('{out}')"
    ).fetchall()
    kinds = dict(
        con.sql(
            f"select error_type, count(*) from delta_scan('{out}') where error_type is not null "
            "group by 1"
        ).fetchall()
    )
    caps, errs = tables(out)
    assert (n, failed) == (len(caps) + len(errs), len(errs)) and kinds["unsafe_path"] == 6
    frame = DeltaTable(str(out)).to_pandas()
    assert sorted(frame["uri"]) == sorted(r["uri"] for r in caps + errs)
    from beam_jobs.caption_table import query

    [(m,)] = query(str(out), "select count(*) from captions where error_type is null").fetchall()
    assert m == len(caps)  # the README's command
    polars = pl.read_delta(str(out)).filter(pl.col("error_type").is_null())
    assert sorted(polars["uri"].to_list()) == sorted(r["uri"] for r in caps)


def test_nothing_escapes_the_output_dir(captioned, inputs):
    root, _, _ = inputs
    assert not (root / "evil.jpg").exists() and not (root.parent / "evil.jpg").exists()
    assert not os.path.exists("/abs.jpg")


def test_rerun_gives_the_same_rows(captioned, inputs):
    out, _ = captioned

    def rows():
        caps = sorted(tables(out)[0], key=lambda r: r["uri"])
        return [{k: v for k, v in r.items() if k != "run_id"} for r in caps]

    before = rows()
    caption(inputs, out)
    assert rows() == before


def test_skip_existing_captions_only_new_inputs(inputs, tmp_path, where):
    _, _, export = inputs
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


def test_multi_processing_mode_with_one_shared_model(inputs, captioned, tmp_path):
    """Worker processes, as on Dataflow, sharing one model through Beam's proxy
    (--large_model), which forwards method calls only: same rows as in-process."""
    _, expected, _ = inputs
    caption(
        inputs,
        tmp_path,
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        "--large_model",
    )
    caps, errs = tables(tmp_path)
    assert len(caps) + len(errs) == len(expected)
    in_process, _ = tables(captioned[0])
    assert {r["uri"]: r["caption"] for r in caps} == {r["uri"]: r["caption"] for r in in_process}


def test_bad_arguments_fail_at_start(inputs, tmp_path):
    root, _, export = inputs
    with pytest.raises(UsageError, match="matches nothing"):
        run(
            [
                "--model",
                export,
                "--input",
                str(tmp_path / "nothing*.jpg"),
                "--output_dir",
                str(tmp_path),
            ]
        )
    with pytest.raises(FormatError, match="no model_export manifest"):
        run(
            [
                "--model",
                str(tmp_path),
                "--input",
                str(root / "images"),
                "--output_dir",
                str(tmp_path),
            ]
        )
    other = json.load(open(os.path.join(export, "manifest.json")))
    other["features"]["backbone"] = "resnet50"
    (tmp_path / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(FormatError, match="resnet50"):
        run(
            [
                "--model",
                str(tmp_path),
                "--input",
                str(root / "images"),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_pipeline_translates_for_dataflow(inputs, tmp_path):
    summary = caption(
        inputs,
        tmp_path / "out",
        "--runner",
        "DataflowRunner",
        "--dry_run",
        "True",
        "--project",
        "demo-project",
        "--region",
        "us-central1",
        "--temp_location",
        "gs://demo-bucket/tmp",
        "--skip_existing",
    )
    assert summary == {"dry_run": True}
    assert not (tmp_path / "out").exists()


def _zip_with_bad_crc(path, members, bad):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    raw = bytearray(path.read_bytes())
    start = raw.index(members[bad]) + 10  # flip a byte inside the bad member's data
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_hostile_inputs_each_end_up_as_exactly_one_row(inputs, tmp_path):
    """Built here: a zip whose middle member fails its CRC, a tar.gz cut halfway, archives
    inside archives, `tar czf`/`zip -r` directory entries, a FIFO named like an image,
    files and members over --max_bytes and a file name that is not UTF-8. The job runs as a
    subprocess, so a read that blocks fails the test instead of hanging it."""
    import subprocess
    import sys

    from tests.test_cli import ENV, ROOT

    _, _, export = inputs
    root = tmp_path / "in"
    root.mkdir()
    images = {f"m{i}.jpg": encode(noise(20 + i), "JPEG") for i in range(6)}
    _zip_with_bad_crc(root / "crc.zip", images, "m2.jpg")
    expected = {f"{root}/crc.zip!/{n}": "ok" for n in images}
    expected[f"{root}/crc.zip!/m2.jpg"] = "corrupt"
    # A tar.gz cut in half: the members before the cut, then one bad_archive row.
    big = {f"t{i}.png": encode(noise(40 + i, (200, 150)), "PNG") for i in range(8)}
    _tar(root / "whole.tar.gz", "w:gz", big)
    data = (root / "whole.tar.gz").read_bytes()
    (root / "whole.tar.gz").unlink()
    (root / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    # Nested archives, directory entries (as tar czf / zip -r write them), an oversized member.
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("deep.jpg", images["m0.jpg"])
    with zipfile.ZipFile(root / "outer.zip", "w") as z:
        z.writestr("photos/", b"")
        z.writestr("photos/a.jpg", images["m1.jpg"])
        z.writestr("photos/inner.zip", inner.getvalue())
        z.writestr("photos/huge.png", b"\0" * 300_000)
    expected[f"{root}/outer.zip!/photos/a.jpg"] = "ok"
    expected[f"{root}/outer.zip!/photos/inner.zip"] = "nested_archive"
    expected[f"{root}/outer.zip!/photos/huge.png"] = "too_large"
    os.mkfifo(root / "pipe.jpg")
    expected[f"{root}/pipe.jpg"] = "not_a_file"
    (root / "big.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 300_000)
    expected[f"{root}/big.jpg"] = "too_large"
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (root / name).write_bytes(images["m3.jpg"])
    expected[f"{root}/caf\\xe9.jpg"] = "bad_file_name"
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "beam_jobs.caption_images", "--model", export]
        + ["--input", str(root), "--output_dir", str(out), "--max_bytes", "200000", *RUNNER],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    caps, errs = tables(out)
    got = {row["uri"]: "ok" for row in caps}
    assert len(got) == len(caps)
    for row in errs:
        assert row["uri"] not in got, row
        got[row["uri"]] = row["error_type"]
    assert len(got) == len(caps) + len(errs)  # exactly once
    cut = {u: k for u, k in got.items() if "cut.tar.gz" in u}
    got = {u: k for u, k in got.items() if "cut.tar.gz" not in u}
    assert got == expected
    members = sorted(u for u in cut if "!/" in u)
    assert 1 <= len(members) < 8 and all(cut[u] == "ok" for u in members)
    assert cut[f"{root}/cut.tar.gz"] == "bad_archive"
    (message,) = [e["message"] for e in errs if e["uri"] == f"{root}/cut.tar.gz"]
    assert f"after {len(members)} member(s)" in message


def test_one_folder_spelled_three_ways_with_the_outputs_inside_it(inputs, tmp_path, monkeypatch):
    """Relative, trailing-slash and double-slash spellings are one uri each; the job's own
    output and attention plots, inside the input folder, are never inputs, even on a rerun."""
    _, _, export = inputs
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(encode(noise(60 + i), "JPEG"))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", export, "--input", "val", "--input", f"{folder}/"]
    argv += ["--input", f"{tmp_path}//val", "--output_dir", str(folder / "captions")]
    argv += ["--attention_dir", str(folder / "plots"), *RUNNER]
    for _ in range(2):
        summary = run(argv)
        caps, errs = tables(folder / "captions")
        assert sorted(r["uri"] for r in caps) == [str(folder / f"{i}.jpg") for i in range(3)]
        assert errs == [] and summary["captioned"] == 3
        counts = last_run(folder / "captions")["counts"]
        assert (counts["captioned"], counts["failed"]) == (3, 0)
    assert len(list((folder / "plots").glob("*.png"))) == 3


def test_a_run_that_lost_an_input_is_never_recorded(tmp_path):
    from beam_jobs.caption_run import write_run_record

    parts = [{"captioned": 3, "failed": 1, "rows": 4}]
    with pytest.raises(RuntimeError, match="1 input\\(s\\) have no row"):
        write_run_record(None, str(tmp_path), "a", parts, [], [], 5, (3, 0, 0), 3)
    assert not list(tmp_path.rglob("*.json"))


def test_a_model_batch_that_raises_becomes_one_error_row_per_image(
    inputs, tmp_path, monkeypatch, where
):
    """Fault injection: the model raises on any batch holding an all-white image."""
    from beam_jobs import inference

    _, _, export = inputs
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


def _kill_when(cmd, ready, env=None, timeout=300):
    """Starts `cmd` and SIGKILLs it once `ready()` is true."""
    import subprocess
    import time

    from tests.test_cli import ENV, ROOT

    proc = subprocess.Popen(
        cmd, env={**ENV, **(env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)
    proc.kill()
    proc.wait()


def _images(folder, count, seed):
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes(encode(noise(seed + i), "JPEG"))
    return sorted(str(p) for p in folder.iterdir())


def test_killed_runs_leave_the_table_whole_and_resume_from_their_files(
    inputs, tmp_path, capsys, where
):
    """SIGKILL a first run once it has finished files: the same command with
    --skip_existing adopts them and captions only the rest. Then SIGKILL reruns that
    replace the table 2 and 7 s in (loading, reading) and once files exist: the table
    stays whole each time, and the resumed rerun replaces it."""
    import subprocess
    import sys
    import time

    from tests.test_cli import ENV, ROOT

    _, _, export = inputs
    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 30, 200)
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
    for delay in (2, 7):
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
    inputs, tmp_path, moment, where
):
    """--num_shards 2, SIGKILLed once its pipeline has finished (its run record is
    written), or once its commit is in the log: the same command with --skip_existing
    ends with every input once, the killed run's files adopted rather than replaced."""
    import sys

    _, _, export = inputs
    out = str(where)
    folder = tmp_path / "in"
    _images(folder, 12, 500)
    argv = ["--model", export, "--input", str(folder), "--output_dir", out]
    argv += ["--batch_size", "4", "--num_shards", "2", *RUNNER]
    run(argv)  # a table to add to
    (folder / "new.jpg").write_bytes(encode(noise(520), "JPEG"))
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv, "--skip_existing"]
    version = where.version()
    ready = where.records if moment == "record" else lambda: where.version() != version
    _kill_when(cmd, ready, where.env)
    assert sorted(_table_uris(out)) in (
        sorted(str(p) for p in folder.iterdir() if p.name != "new.jpg"),
        sorted(str(p) for p in folder.iterdir()),
    )
    again = run([*argv, "--skip_existing"])
    assert again["captioned"] == 0
    assert sorted(_table_uris(out)) == sorted(str(p) for p in folder.iterdir())


def test_two_runs_on_one_table_at_once_each_input_once(inputs, tmp_path, where):
    """A second run started while the first runs, both adding overlapping inputs to one
    table: one commits, the other fails in one line and commits nothing; the table holds
    every input once, and the loser's command, run again, adds what is left."""
    import subprocess
    import sys
    import time

    from tests.test_cli import ENV, ROOT

    _, _, export = inputs
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


def test_a_refused_command_keeps_a_killed_runs_files(inputs, tmp_path, where):
    """A killed --skip_existing run's files survive a command that is then refused
    (another decoding), and the resume adopts them."""
    import sys

    _, _, export = inputs
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


def test_a_flag_typo_is_refused_and_the_table_kept(inputs, tmp_path, capsys):
    _, _, export = inputs
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


def test_an_old_layout_folder_is_refused_in_one_line(inputs, tmp_path):
    _, _, export = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "captions", "format_version": 1}')
    (tmp_path / "a.jpg").write_bytes(encode(noise(800), "JPEG"))
    with pytest.raises(UsageError, match="old layout.*python -m beam_jobs.caption_table convert"):
        run(["--model", export, "--input", str(tmp_path / "a.jpg"), "--output_dir", str(out)])


def test_no_input_is_skipped_without_a_word(inputs, tmp_path, monkeypatch):
    """A folder that cannot be listed, a linked folder, a link cycle and a folder whose
    name holds the archive separator: each is captioned or an error row, once, however
    often --skip_existing runs; the output folder as input is refused."""
    _, _, export = inputs
    root, out = tmp_path / "in", tmp_path / "out"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "a.jpg").write_bytes(encode(noise(400), "JPEG"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jpg").write_bytes(encode(noise(401), "JPEG"))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "linked" / "loop").symlink_to(root, target_is_directory=True)
    (root / "x!").mkdir()
    (root / "x!" / "c.jpg").write_bytes(encode(noise(402), "JPEG"))
    (root / "d.jpg").write_bytes(encode(noise(403), "JPEG"))
    scandir = os.scandir

    def locked(path):  # the tests run as root, who can list any folder: a fault instead
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    argv = ["--model", export, "--input", str(root), "--output_dir", str(out), *RUNNER]
    run(argv)
    expected = {
        f"{root}/d.jpg": "ok",
        f"{root}/linked/b.jpg": "ok",
        f"{root}/linked/loop": "link_cycle",
        f"{root}/locked": "unreadable_folder",
        f"{root}/x!/c.jpg": "ambiguous_name",
    }
    for _ in range(2):
        caps, errs = tables(out)
        got = {r["uri"]: "ok" for r in caps} | {r["uri"]: r["error_type"] for r in errs}
        assert got == expected
        assert len(caps) + len(errs) == len(expected)
        run([*argv, "--skip_existing"])
    with pytest.raises(UsageError, match="is in this job's own output folder"):
        run(["--model", export, "--input", str(out), "--output_dir", str(out), *RUNNER])


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_that_says_how_to_resume(inputs, tmp_path, small_disk):
    """The output's disk fills up: one line saying what was kept and how to go on (no
    traceback); after space is freed, the resume captions every input exactly once."""
    import subprocess
    import sys

    from tests.test_cli import ENV, ROOT

    _, _, export = inputs
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.jpg").write_bytes(encode(noise(300 + i), "JPEG"))
    out = small_disk / "out"
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    argv = ["--model", export, "--input", str(folder), "--output_dir", str(out)]
    argv += ["--batch_size", "4", "--checkpoint_seconds", "0", *RUNNER]
    cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the device of {out}"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "--skip_existing" in last
    filler.unlink()
    resumed = run([*argv, "--skip_existing"])
    assert resumed["captioned"] + resumed["failed"] <= 12
    assert sorted(_table_uris(out)) == sorted(str(p) for p in folder.iterdir())


def test_maintenance_convert_compact_vacuum_history(inputs, tmp_path, where, capsys):
    """An old-layout folder converted in place; compaction changes no row and joins the
    small files; vacuum deletes what no recent version reads (replaced and compacted
    files, a killed run's orphans) and nothing a version reads."""
    import pyarrow as pa

    from beam_jobs import caption_table
    from beam_jobs.caption_table import main as table_command

    _, _, export = inputs
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
    inputs, tmp_path, monkeypatch
):
    """Every image failed transiently (the model raised); the --skip_existing run that
    tries them again is SIGKILLed once it has saved files, and its resume adopts them:
    each input ends with one row, its caption, and no error row is left."""
    import sys

    from beam_jobs import inference

    _, _, export = inputs
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
