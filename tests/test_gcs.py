"""Every stage with every path on gs://, against a local GCS emulator this test starts.

The commands run as subprocesses, the Beam jobs on the multi_processing runner so
that reading and writing happens in worker processes, as on Dataflow. TensorFlow's
own GCS client (checkpoints, TensorBoard, SavedModel, tf.io.gfile) reaches the
emulator through `tests.gcs`'s TLS proxy, Beam's through STORAGE_EMULATOR_HOST.
Nothing of the run is on the local disk but the source data before upload.
"""

import io
import json
import os
import shlex
import subprocess
import sys
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.make_shapes import make_split
from model.evaluation.metrics import METRIC_KEYS
from tests.conftest import GCS_BUCKET
from tests.tables import caption_rows, duckdb_delta, last_run
from tests.test_cli import ENV, ROOT

pytestmark = pytest.mark.slow
BUCKET = GCS_BUCKET
# The I/O happens in worker processes, as on Dataflow (one for extraction, to save a
# TensorFlow start-up; two for captioning, to split the inputs between them).
ONE_WORKER = ["--direct_running_mode=multi_processing", "--direct_num_workers=1"]
WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def command(env, module, *args):
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**ENV, **env},
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, f"{module} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def upload(local_dir, remote):
    import tensorflow as tf

    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir)
            tf.io.gfile.makedirs(os.path.dirname(f"{remote}/{rel}"))
            tf.io.gfile.copy(path, f"{remote}/{rel}", overwrite=True)


def names(pattern):
    import tensorflow as tf

    return sorted(p.rsplit("/", 1)[-1] for p in tf.io.gfile.glob(pattern))


def read_json(path):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def duckdb_delta_gcs(env):
    """DuckDB reading gs:// Delta tables from the emulator, as a user's DuckDB reads GCS:
    through an S3-style secret whose endpoint is the emulator (its XML API)."""
    con = duckdb_delta("httpfs")
    host = env["STORAGE_EMULATOR_HOST"].split("://")[1]
    con.execute(
        f"CREATE SECRET gcs (TYPE gcs, KEY_ID 'k', SECRET 's', ENDPOINT '{host}', "
        "URL_STYLE 'path', USE_SSL false)"
    )
    return con


def test_every_stage_with_every_path_on_gcs(gcs, tmp_path):
    """The end-to-end test: each hand-off between the stages, as `make demo` runs them
    (smaller), every path on gs://."""
    import tensorflow as tf

    local = tmp_path / "data"
    for split, n, first in (("train", 40, 1), ("val", 10, 1000)):
        make_split(str(local), split, n, seed=3, first_id=first)
    val_names = sorted(os.listdir(local / "val"))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name in val_names[:4]:
            z.write(local / "val" / name, f"inner/{name}")
        z.writestr("broken.jpg", b"not an image")
    gs = f"gs://{BUCKET}"
    upload(local, f"{gs}/data")
    with tf.io.gfile.GFile(f"{gs}/archives/val.zip", "wb") as f:
        f.write(archive.getvalue())
    feats, model, caps = f"{gs}/features", f"{gs}/model", f"{gs}/captions"
    stderr = []

    for split in ("train", "val"):
        stderr.append(
            command(
                gcs,
                "beam_jobs.extract_features",
                *("--split", split),
                *("--captions_json", f"{gs}/data/annotations/captions_{split}.json"),
                *("--images_dir", f"{gs}/data/{split}", "--output_dir", feats),
                *("--weights", "none", "--vocab_size", "50", "--batch_size", "10"),
                *ONE_WORKER,
            ).stderr
        )
    manifest = read_json(f"{feats}/manifest.json")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 40, "val": 10}
    assert manifest["vocab"]["file"] in names(f"{feats}/*")

    command(
        gcs,
        "model.train",
        *("--data_dir", feats, "--model_dir", model, "--preset", "tiny", "--epochs", "3"),
        *("--batch_size", "32", "--learning_rate", "5e-3", "--warmup_steps", "2"),
        *("--max_length", "12", "--verbose", "0"),
    )
    assert {"checkpoints", "logs", "export", "config.json"} <= set(
        n.rstrip("/") for n in tf.io.gfile.listdir(model)
    )
    assert names(f"{model}/logs/events.out.tfevents.*")
    export = f"{model}/export"
    assert {"captioner.keras", "vocab.txt", "manifest.json", "serving/"} <= set(
        tf.io.gfile.listdir(export)
    )
    history = read_json(f"{export}/manifest.json")["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]

    evaluated = command(
        gcs,
        "model.evaluate",
        *("--model", export, "--data_dir", feats, "--split", "val", "--plots", "2"),
    )
    stderr.append(evaluated.stderr)
    metrics = read_json(f"{model}/eval/val/metrics.json")
    assert metrics["split"] == "val" and all(
        k in metrics for k in METRIC_KEYS if k != "METEOR" or metrics["comparable"]
    )
    assert len(names(f"{model}/eval/val/attention_*.png")) == 2
    file_names = {
        im["id"]: im["file_name"]
        for im in json.load(open(local / "annotations" / "captions_val.json"))["images"]
    }

    def predictions(path):
        return {file_names[p["image_id"]]: p["caption"] for p in read_json(path)}

    captioned = command(
        gcs,
        "beam_jobs.caption_images",
        *("--model", export, "--input", f"{gs}/data/val"),
        *("--input", f"{gs}/archives/val.zip", "--output_dir", caps),
        *("--attention_dir", f"{gs}/attention", "--attention_plots", "3", "--batch_size", "4"),
        *WORKERS,
    )
    stderr.append(captioned.stderr)
    rows, errors = caption_rows(caps)
    assert len(rows) == 10 + 4 and len(errors) == 1
    assert {r["uri"].split("!/")[0] for r in rows} == {f"{gs}/archives/val.zip"} | {
        f"{gs}/data/val/{n}" for n in val_names
    }
    assert errors[0]["uri"] == f"{gs}/archives/val.zip!/broken.jpg"
    assert len(names(f"{gs}/attention/*.png")) == 3
    counts = last_run(caps)["counts"]
    assert (counts["captioned"], counts["failed"]) == (14, 1)
    [(n,)] = duckdb_delta_gcs(gcs).sql(f"select count(*) from delta_scan('{caps}')").fetchall()
    assert n == 15
    bulk = {r["uri"].rsplit("/", 1)[1]: r["caption"] for r in rows if "!/" not in r["uri"]}
    from_features = predictions(f"{model}/eval/val/predictions.json")
    # Stage 3 computes features from raw images; evaluation decodes stage 1's float16 shards.
    assert {name: bulk[name] for name in from_features} == from_features

    # The serving SavedModel, loaded from gs:// by a process with none of this project's code.
    assert serve_in_clean_process(gcs, f"{export}/serving", local / "val", val_names) == bulk

    # Beam search through both commands: recorded, and the same captions from both paths.
    beam = ["--beam_size", "3", "--length_penalty", "0.6"]
    command(
        gcs,
        "model.evaluate",
        *("--model", export, "--data_dir", feats, "--split", "val"),
        *("--output_dir", f"{gs}/eval_beam", *beam, "--no_java"),
    )
    assert read_json(f"{gs}/eval_beam/metrics.json")["decoding"] == {
        "max_length": 12,
        "beam_size": 3,
        "length_penalty": 0.6,
        "allow_unk": False,
        "block_repeats": 3,
    }
    with tf.io.gfile.GFile(f"{gs}/big/huge.jpg", "wb") as f:  # refused by its size alone
        f.write(os.urandom(300_000))
    command(
        gcs,
        "beam_jobs.caption_images",
        *("--model", export, "--input", f"{gs}/data/val", "--output_dir", f"{gs}/beam"),
        *("--input", f"{gs}/big", "--max_bytes", "200000", "--batch_size", "10", *beam),
    )
    assert last_run(f"{gs}/beam")["decoding"]["beam_size"] == 3
    beam_rows, [too_large] = caption_rows(f"{gs}/beam")
    assert (too_large["uri"], too_large["error_type"]) == (f"{gs}/big/huge.jpg", "too_large")
    assert {r["beam_size"] for r in beam_rows} == {3}
    beam_bulk = {r["uri"].rsplit("/", 1)[1]: r["caption"] for r in beam_rows}
    beam_features = predictions(f"{gs}/eval_beam/predictions.json")
    assert {name: beam_bulk[name] for name in beam_features} == beam_features

    # model.caption reads gs:// too, and refuses an object by its size before reading it.
    from model.caption import run as caption_files

    one = f"{gs}/data/val/{val_names[0]}"
    refused, read = caption_files(
        ["--model", export, f"{gs}/big/huge.jpg", one, "--max_bytes", "200000"]
    )
    assert refused["error_type"] == "too_large", refused
    assert read["caption"] == bulk[val_names[0]]

    # Quiet: progress lines and our own, nothing from Java's tokenizer or TF's start-up.
    for err in stderr:
        assert "PTBTokenizer" not in err and "cuInit" not in err and "absl" not in err, err
    assert not [p for p in os.listdir(ROOT) if p.startswith("gs:")]


SERVE = """
import json, sys
import tensorflow as tf
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
paths = sys.argv[2:]
out = fn(images=tf.constant([open(p, "rb").read() for p in paths]))
assert out["caption"].dtype == tf.string and out["token_ids"].dtype == tf.int32
assert not [m for m in sys.modules if m.split(".")[0] in ("model", "beam_jobs")]
print(json.dumps([c.decode() for c in out["caption"].numpy()]))
"""


def serve_in_clean_process(env, saved_model, folder, file_names):
    clean = {k: v for k, v in {**os.environ, **env}.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", SERVE, saved_model, *(str(folder / n) for n in file_names)],
        capture_output=True,
        text=True,
        env=clean,
        cwd=folder,  # not the repository: its packages cannot be imported
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(file_names, json.loads(r.stdout.strip().splitlines()[-1]), strict=True))


def readme_dataflow_commands():
    """The commands between the dataflow-commands markers of docs/cloud.md, as argv lists."""
    text = open(os.path.join(ROOT, "docs", "cloud.md")).read()
    block = text.split("<!-- dataflow-commands")[1].split("<!-- /dataflow-commands -->")[0]
    lines = [
        line
        for part in block.split("```")[1::2]
        for line in part.replace("\\\n", " ").splitlines()[1:]
        if line.strip()
    ]
    return [shlex.split(line) for line in lines]


def test_readme_dataflow_commands_translate(gcs, tmp_path, monkeypatch):
    """Each Dataflow command of docs/cloud.md, verbatim but for the bucket and project,
    translated with --dry_run True against objects on the emulator."""
    import tensorflow as tf

    from beam_jobs import caption_images, extract_features
    from tests.fixtures import write_tiny_export

    commands = readme_dataflow_commands()
    assert len(commands) == 5
    root = f"gs://{BUCKET}/dataflow"
    local = tmp_path / "data"
    make_split(str(local), "train", 2, seed=4)
    upload(local / "annotations", f"{root}/coco/annotations")
    tf.io.gfile.rename(
        f"{root}/coco/annotations/captions_train.json",
        f"{root}/coco/annotations/captions_train2014.json",
    )
    upload(local / "train", f"{root}/coco/train2014")
    upload(local / "train", f"{root}/photos")
    with tf.io.gfile.GFile(f"{root}/archives/2024.tar.gz", "wb") as f:
        f.write(b"")  # only matched at translation time
    upload(write_tiny_export(str(tmp_path / "export")), f"{root}/runs/coco/export")
    products = tmp_path / "products.parquet"
    pq.write_table(
        pa.table({"id": [1], "url": ["https://example.com/1.jpg"], "title": ["a"]}), products
    )
    tf.io.gfile.copy(str(products), f"{root}/exports/products-000.parquet")
    for shard in ("00000", "00001"):
        with tf.io.gfile.GFile(f"{root}/shards/{shard}.tar", "wb") as f:
            f.write(b"")  # only matched at translation time
    monkeypatch.chdir(ROOT)  # --setup_file ./setup.py
    jobs = {
        "beam_jobs.extract_features": extract_features,
        "beam_jobs.caption_images": caption_images,
    }
    for argv in commands:
        assert argv[:2] == ["python", "-m"] and argv[2] in jobs, argv
        args = [a.replace("gs://B/", f"{root}/") for a in argv[3:]]
        args[args.index("--project") + 1] = "demo-project"
        assert jobs[argv[2]].run([*args, "--dry_run", "True"]) == {"dry_run": True}, argv
