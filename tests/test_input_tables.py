"""Tables of inputs (--input_table) and http(s) inputs, against a real HTTP server on
loopback that serves the web's faults (`tests.http_faults`): every row of the input table
ends up exactly once in the caption table, with its key and kept columns, under retries,
a SIGKILL and --skip_existing resumes."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs.caption_images import run
from model.cli import UsageError
from model.images.fetch import Fetcher, FetchSettings, retry_after
from model.images.preprocess import ImageError
from tests.fixtures import write_tiny_export
from tests.helpers import encode, noise
from tests.http_faults import FaultServer
from tests.tables import Where, caption_rows, duckdb_delta, last_run

RUNNER = ["--runner", "FnApiRunner"]
FAST = ["--fetch_timeout", "1", "--fetch_retries", "1", "--max_bytes", "200000"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_tiny_export(str(tmp_path_factory.mktemp("export") / "export"))


@pytest.fixture
def server():
    images = {f"{i}.jpg": encode(noise(300 + i), "JPEG") for i in range(40)}
    with FaultServer(images) as s:
        yield s


def fetcher(**kw) -> Fetcher:
    return Fetcher(FetchSettings(**{"timeout": 1.0, "retries": 1, "max_bytes": 200_000, **kw}))


@pytest.mark.parametrize(
    "path, kind",
    [
        ("status/404", "http_404"),
        ("status/403", "http_403"),
        ("status/503", "http_503"),
        ("slow/1.jpg", "http_timeout"),
        ("reset/1.jpg", "http_connection"),
        ("loop/a", "redirect_loop"),
        ("big", "too_large"),
        ("endless", "too_large"),
    ],
)
def test_each_fault_is_one_named_error(server, path, kind):
    import time

    start = time.monotonic()
    with pytest.raises(ImageError) as e:
        fetcher().fetch(server.url(path))
    assert e.value.kind == kind
    retried = kind in ("http_503", "http_timeout", "http_connection")
    assert server.hits[path] == (2 if retried else 1)  # --fetch_retries 1
    # Two attempts of at most --fetch_timeout 1 s each and a 0.5 s backoff: a server that
    # trickles its body (64 bytes every 0.3 s) holds the thread no longer than that.
    assert time.monotonic() - start < 5


def test_retries_redirects_and_the_user_agent(server):
    f = fetcher()
    image = server.images["2.jpg"]
    assert f.fetch(server.url("flaky/2.jpg")) == image  # 500, then 200
    assert f.fetch(server.url("hop/2.jpg")) == image  # 301 to img/2.jpg
    assert f.fetch(server.url("typed/2.jpg")) == image  # the body decides, not Content-Type
    import time

    start = time.monotonic()
    assert f.fetch(server.url("busy/2.jpg")) == image  # 429 + Retry-After: 1
    assert time.monotonic() - start >= 0.9
    assert server.agents == {
        "show-attend-tell-captioner/1.0 (bulk image captioning; Beam caption_images)"
    }
    with pytest.raises(ImageError, match="http_404|HTTP 404"):
        fetcher(retries=0).fetch(server.url("status/404"))
    assert retry_after("7") == 7.0 and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def write_table(path, rows, kind="parquet"):
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_table_of_urls_each_row_once_with_its_key_and_columns(export, tmp_path, server):
    """A Parquet table of ids, URLs and product columns, every fault of the web in it, a
    repeated id, a row without a URL and a file:// URL: one row each, joined back by key
    in DuckDB; then the host comes back and --skip_existing fetches only the transient
    failures again."""
    faults = {
        "status/404": "http_404",
        "slow/5.jpg": "http_timeout",
        "reset/6.jpg": "http_connection",
        "loop/a": "redirect_loop",
        "big": "too_large",
        "endless": "too_large",
        "html/7.jpg": "not_an_image",
    }
    good = ["img/0.jpg", "img/1.jpg", "flaky/2.jpg", "busy/3.jpg", "hop/4.jpg", "typed/8.jpg"]
    rows = [
        {"id": 100 + i, "url": server.url(path), "sku": f"S{i}", "price": 1.5 * i}
        for i, path in enumerate(good + list(faults))
    ]
    rows.append({"id": 100, "url": server.url("img/9.jpg"), "sku": "dup", "price": 0.0})
    rows.append({"id": 200, "url": None, "sku": "nourl", "price": 0.0})
    rows.append({"id": 201, "url": "file:///etc/passwd", "sku": "file", "price": 0.0})
    table = write_table(tmp_path / "products.parquet", rows)
    out = str(tmp_path / "captions")
    argv = ["--model", export, "--input_table", table, "--key_column", "id"]
    argv += ["--keep_columns", "sku,price", "--output_dir", out, *FAST, *RUNNER]
    summary = run(argv)

    caps, errs = caption_rows(out)
    assert len(caps) + len(errs) == len(rows)
    by_sku = {r["sku"]: r for r in caps + errs}
    assert sorted(by_sku) == sorted(r["sku"] for r in rows)
    for i, path in enumerate(good):
        row = by_sku[f"S{i}"]
        assert (row["key"], row["uri"], row["error_type"]) == (str(100 + i), server.url(path), None)
        assert row["price"] == 1.5 * i and row["sha256"]
    for i, (path, kind) in enumerate(faults.items(), start=len(good)):
        assert (by_sku[f"S{i}"]["key"], by_sku[f"S{i}"]["error_type"]) == (str(100 + i), kind), path
    assert by_sku["dup"]["error_type"] == "duplicate_key" and by_sku["dup"]["key"] == "100"
    assert by_sku["nourl"]["error_type"] == "missing_uri" and by_sku["nourl"]["key"] == "200"
    assert by_sku["file"]["error_type"] == "unsupported_uri"
    assert summary["captioned"] == len(good)

    # The join back, as a user writes it: every input row finds its one caption row.
    con = duckdb_delta()
    joined = con.sql(
        f"SELECT p.id, c.caption, c.error_type FROM read_parquet('{table}') p "
        f"JOIN delta_scan('{out}') c ON CAST(p.id AS VARCHAR) = c.key AND p.sku = c.sku"
    ).fetchall()
    assert len(joined) == len(rows)
    types = con.sql(f"SELECT typeof(price), typeof(sku) FROM delta_scan('{out}') LIMIT 1")
    assert types.fetchall() == [("DOUBLE", "VARCHAR")]

    # The hosts come back: a --skip_existing run fetches the transient failures (timeout,
    # reset) again and nothing else; their old rows go.
    server.healthy = True
    hits = dict(server.hits)
    again = run([*argv, "--skip_existing"])
    assert (again["captioned"], again["failed"]) == (2, 0)
    assert {p for p in server.hits if server.hits[p] != hits.get(p)} == {
        "slow/5.jpg",
        "reset/6.jpg",
    }
    caps, errs = caption_rows(out)
    assert len(caps) + len(errs) == len(rows) and len(caps) == len(good) + 2
    assert last_run(out)["counts"]["superseded"] == 2
    third = run([*argv, "--skip_existing"])
    assert (third["captioned"], third["failed"]) == (0, 0)


def test_csv_and_jsonl_tables_with_paths_members_and_bad_rows(export, tmp_path):
    """Text tables: relative paths (to the table's folder), an archive member, a quoted
    field with a newline, a line with too many fields, a line that is not JSON; mixed with
    a folder --input that holds one of the table's files (one row, the table's)."""
    import tarfile

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(encode(noise(400 + i), "JPEG"))
    with tarfile.open(photos / "pack.tar", "w") as tar:
        tar.add(photos / "0.jpg", arcname="in/zero.jpg")
    csv_path = photos / "list.csv"
    csv_path.write_text(
        'path,id,note\n0.jpg,a,"two\nlines"\n1.jpg,b,plain\n1.jpg,c,x,extra\n'
        f"{photos}/pack.tar!/in/zero.jpg,d,member\n"
    )
    jsonl = write_table(
        tmp_path / "more.jsonl",
        [{"path": "photos/2.jpg", "id": "e", "note": 7}, {"path": "photos/9.jpg", "id": "f"}],
        "jsonl",
    )
    with open(jsonl, "a") as f:
        f.write("{not json\n")
    out = str(tmp_path / "captions")
    argv = ["--model", export, "--input_table", str(csv_path), "--input_table", jsonl]
    argv += ["--key_column", "id", "--keep_columns", "note", "--output_dir", out, *RUNNER]
    run(argv)
    caps, errs = caption_rows(out)
    got = {r["key"]: (r["note"], r["error_type"]) for r in caps + errs}
    bad = {k: v for k, v in got.items() if "#row" in k}
    assert {k: v for k, v in got.items() if "#row" not in k} == {
        "a": ("two\nlines", None),
        "b": ("plain", None),
        "d": ("member", None),
        "e": ("7", None),
        "f": (None, "missing_file"),
    }
    assert sorted(v for v in bad.values()) == [(None, "bad_row"), (None, "bad_row")]
    assert {r["uri"] for r in caps} >= {f"{photos}/0.jpg", f"{photos}/pack.tar!/in/zero.jpg"}


def test_table_flags_fail_at_start_in_one_line(export, tmp_path):
    table = write_table(tmp_path / "t.parquet", [{"link": "a.jpg", "caption": "x"}])
    base = ["--model", export, "--output_dir", str(tmp_path / "o"), *RUNNER]
    with pytest.raises(UsageError, match="no url, uri or path column .*it has: link, caption"):
        run([*base, "--input_table", table])
    with pytest.raises(UsageError, match="has no column 'id' \\(--key_column\\)"):
        run([*base, "--input_table", table, "--uri_column", "link", "--key_column", "id"])
    with pytest.raises(UsageError, match="--keep_columns caption: the caption table has a co"):
        run([*base, "--input_table", table, "--uri_column", "link", "--keep_columns", "caption"])
    with pytest.raises(UsageError, match="--input_table matches nothing"):
        run([*base, "--input_table", str(tmp_path / "none-*.parquet")])
    with pytest.raises(UsageError, match="give the images as --input"):
        run(base)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_killed_url_run_resumes_with_each_row_once(export, tmp_path):
    """SIGKILL a run over a table of 40 slow URLs once it has saved rows; the same command
    with --skip_existing adopts them, fetches only the rest, and every row is there once
    with its key."""
    from tests.test_caption_table import _kill_when

    images = {f"{i}.jpg": encode(noise(500 + i), "JPEG") for i in range(40)}
    with FaultServer(images, delay=0.15) as server:
        rows = [{"id": f"k{i}", "url": server.url(f"delay/{i}.jpg")} for i in range(40)]
        table = write_table(tmp_path / "urls.parquet", rows)
        out = Where(str(tmp_path / "captions"))
        argv = ["--model", export, "--input_table", table, "--key_column", "id"]
        argv += ["--output_dir", str(out), "--batch_size", "2", "--checkpoint_seconds", "0"]
        argv += ["--decode_threads", "2", *RUNNER]
        cmd = [sys.executable, "-m", "beam_jobs.caption_images", *argv]
        _kill_when(cmd, lambda: len(out.parts()) >= 3)
        kept = out.rows_in(out.parts())
        assert 0 < kept < 40
        before = sum(server.hits.values())
        resumed = run([*argv, "--skip_existing"])
        assert resumed["captioned"] == 40 - kept
        assert sum(server.hits.values()) - before == 40 - kept  # the saved rows are not fetched
        caps, errs = caption_rows(str(out))
        assert not errs and sorted(r["key"] for r in caps) == sorted(r["id"] for r in rows)


def write_shards(folder, shards, per_shard=3, seed=600):
    """WebDataset shards as img2dataset writes them: per sample KEY.jpg, KEY.json, KEY.txt;
    beside each shard its .parquet and _stats.json."""
    import io
    import tarfile

    folder.mkdir(exist_ok=True)
    for s in shards:
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                meta = {"url": f"https://example.com/{key}.jpg", "width": 64, "status": "success"}
                for name, data in [
                    (f"{key}.jpg", encode(noise(seed + 10 * s + j), "JPEG")),
                    (f"{key}.json", json.dumps(meta).encode()),
                    (f"{key}.txt", f"alt text {key}".encode()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(
            pa.table({"key": [f"{s:05d}{j:04d}" for j in range(per_shard)]}),
            folder / f"{s:05d}.parquet",
        )
        (folder / f"{s:05d}_stats.json").write_text("{}")


def test_webdataset_shards_keyed_by_sample_and_resumed(export, tmp_path):
    """`shards/{00000..00001}.tar`: one row per sample, keyed by its sample key, keeping
    JSON fields and the .txt; a rerun adds nothing; a new shard adds only its samples; an
    img2dataset folder (shards with .parquet beside them) captions as it is."""
    shards = tmp_path / "shards"
    write_shards(shards, [0, 1])
    out = str(tmp_path / "captions")
    argv = ["--model", export, "--output_dir", out, "--keep_columns", "url,txt,width:source_width"]
    argv += RUNNER
    first = run([*argv, "--input", f"{shards}/{{00000..00001}}.tar"])
    assert first["captioned"] == 6
    caps, errs = caption_rows(out)
    assert not errs
    row = {r["key"]: r for r in caps}["000010002"]
    assert row["uri"] == f"{shards}/00001.tar!/000010002.jpg"
    assert (row["url"], row["txt"], row["source_width"]) == (
        "https://example.com/000010002.jpg",
        "alt text 000010002",
        "64",
    )
    again = run([*argv, "--input", f"{shards}/{{00000..00001}}.tar", "--skip_existing"])
    assert (again["captioned"], again["failed"]) == (0, 0)
    write_shards(shards, [2])
    more = run([*argv, "--input", f"{shards}/{{00000..00002}}.tar", "--skip_existing"])
    assert (more["captioned"], more["failed"]) == (3, 0)
    caps, _ = caption_rows(out)
    assert sorted(r["key"] for r in caps) == [f"{s:05d}{j:04d}" for s in range(3) for j in range(3)]

    folder_out = str(tmp_path / "folder")
    run(["--model", export, "--output_dir", folder_out, "--input", str(shards), *RUNNER])
    caps, errs = caption_rows(folder_out)
    assert len(caps) == 9 and not errs


@pytest.mark.slow
def test_tables_and_shards_on_gcs(export, tmp_path, gcs):
    """The table, the images it names (relative paths), and WebDataset shards all on gs://
    (the emulator); the caption table too. A rerun with --skip_existing adds nothing."""
    from apache_beam.io.filesystems import FileSystems

    from tests.conftest import GCS_BUCKET

    root = f"gs://{GCS_BUCKET}/{tmp_path.name}"

    def put(path, data):
        with FileSystems.create(path) as f:
            f.write(data)

    for i in range(3):
        put(f"{root}/photos/{i}.jpg", encode(noise(700 + i), "JPEG"))
    table = tmp_path / "t.jsonl"
    write_table(table, [{"path": f"photos/{i}.jpg", "id": f"p{i}"} for i in range(3)], "jsonl")
    put(f"{root}/t.jsonl", table.read_bytes())
    write_shards(tmp_path / "shards", [0, 1], per_shard=2)
    for s in (0, 1):
        put(f"{root}/shards/{s:05d}.tar", (tmp_path / "shards" / f"{s:05d}.tar").read_bytes())
    out = Where(f"{root}/captions", gcs)
    argv = ["--model", export, "--output_dir", str(out), "--input_table", f"{root}/t.jsonl"]
    argv += ["--key_column", "id", "--input", f"{root}/shards/{{00000..00001}}.tar", *RUNNER]
    summary = run(argv)
    assert (summary["captioned"], summary["failed"]) == (7, 0)
    caps, _ = caption_rows(str(out))
    keys = {r["key"]: r["uri"] for r in caps}
    assert keys["p1"] == f"{root}/photos/1.jpg"
    assert keys["000010001"] == f"{root}/shards/00001.tar!/000010001.jpg"
    again = run([*argv, "--skip_existing"])
    assert (again["captioned"], again["failed"]) == (0, 0)
