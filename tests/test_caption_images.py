import hashlib
import io
import json
import os
import tarfile
import warnings
import zipfile

import pyarrow.parquet as pq
import pytest

from beam_jobs.caption_images import run
from model.cli import UsageError
from model.io.formats import FormatError
from model.text.ngrams import has_repeated_ngram
from model.text.vocab import Vocabulary
from tests.fixtures import write_tiny_export
from tests.helpers import bad_images, encode, good_images, noise
from tests.tables import caption_rows, duckdb_delta, last_run, table_uris

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
        "empty_captions": sum(not r["caption"] for r in caps),
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


def test_no_input_is_skipped_without_a_word(inputs, tmp_path, monkeypatch):
    """A folder that cannot be listed, a linked folder, a link cycle, a second name for a
    folder and a folder whose name holds the archive separator: each is captioned or an
    error row naming the true cause, once, however often --skip_existing runs; the
    output folder as input is refused."""
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
    (root / "sub").mkdir()  # and a second name for it, listed first
    (root / "sub" / "e.jpg").write_bytes(encode(noise(404), "JPEG"))
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)
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
        f"{root}/sub/e.jpg": "ok",  # under its real name, whatever the order
        f"{root}/alias": "linked_folder",
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


def test_repeated_member_names_and_glob_characters_in_real_names(inputs, tmp_path):
    """A tar with two `dup.jpg` and a zip with two `a.jpg` (both allowed, and found in
    hand-made and WebDataset tars): every member is its own row, the later ones
    `NAME#2`. A file `img[1].jpg` beside `img1.jpg`, and a folder `photos [1]`, given as
    --input: each path is itself, not a pattern."""
    _, _, export = inputs
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    a, b, c = (encode(noise(500 + i), "JPEG") for i in range(3))
    with tarfile.open(root / "dup.tar", "w") as tar:
        for name, data in (("dup.jpg", a), ("dup.jpg", b)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        with zipfile.ZipFile(root / "dup.zip", "w") as z:
            z.writestr("a.jpg", a)
            z.writestr("a.jpg", b)
    (root / "img[1].jpg").write_bytes(a)
    (root / "img1.jpg").write_bytes(b)
    (tmp_path / "photos [1]").mkdir()
    (tmp_path / "photos [1]" / "p.jpg").write_bytes(c)
    inputs_ = [root / "dup.tar", root / "dup.zip", root / "img[1].jpg", tmp_path / "photos [1]"]
    argv = ["--model", export, "--output_dir", str(out), *RUNNER]
    run([*argv, *(x for i in inputs_ for x in ("--input", str(i)))])
    caps, errs = tables(out)
    assert not errs
    got = {r["uri"]: r["sha256"] for r in caps}
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in (("a", a), ("b", b), ("c", c))}
    assert got == {
        f"{root}/dup.tar!/dup.jpg": sha["a"],
        f"{root}/dup.tar!/dup.jpg#2": sha["b"],
        f"{root}/dup.zip!/a.jpg": sha["a"],
        f"{root}/dup.zip!/a.jpg#2": sha["b"],
        f"{root}/img[1].jpg": sha["a"],
        f"{tmp_path}/photos [1]/p.jpg": sha["c"],
    }


def test_a_model_that_says_nothing_is_told_not_silently_tabled(tmp_path, capsys):
    """A model that gives an empty caption for most images (trained too briefly, or fed
    other features) is a warning of the Beam job, `model.caption` and `model.evaluate`,
    not a table of empty strings that score zero without a word."""
    from model.caption import run as caption_files

    export = write_tiny_export(str(tmp_path / "mute"), mute=True)
    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(encode(noise(600 + i), "JPEG"))
    run(["--model", export, "--input", str(images), "--output_dir", str(tmp_path / "out"), *RUNNER])
    assert {r["caption"] for r in caption_rows(tmp_path / "out")[0]} == {""}
    assert "warning: 3 of 3 captions are empty" in capsys.readouterr().err
    rows = caption_files(["--model", export, *map(str, sorted(images.iterdir()))])
    assert [r["caption"] for r in rows] == ["", "", ""]
    assert "warning: 3 of 3 captions are empty" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    from tests.helpers import tmpfs

    with tmpfs(tmp_path / "disk", "size=4m") as mount:
        yield mount


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
    assert sorted(table_uris(out)) == sorted(str(p) for p in folder.iterdir())
