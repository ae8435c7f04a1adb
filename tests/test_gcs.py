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
import subprocess
import sys
import zipfile

import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from model.datasets.make_shapes import make_split
from tests.gcs import environment, gcs_emulator
from tests.test_cli import ENV, ROOT

pytestmark = pytest.mark.slow
BUCKET = "captioning"
# The I/O happens in worker processes, as on Dataflow (one for extraction, to save a
# TensorFlow start-up; two for captioning, to split the inputs between them).
ONE_WORKER = ["--direct_running_mode=multi_processing", "--direct_num_workers=1"]
WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as env, environment(env):
        yield env


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


def parquet_rows(env, folder, prefix):
    """Read back as a user would, with pyarrow's own GCS client."""
    host = env["STORAGE_EMULATOR_HOST"].split("://")[1]
    fs = pyarrow.fs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host)
    files = [
        info.path
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
        if info.base_name.startswith(prefix) and info.base_name.endswith(".parquet")
    ]
    if not files:
        return []
    return pq.read_table(files, filesystem=fs).to_pylist()


def test_every_stage_with_every_path_on_gcs(gcs, tmp_path):
    import tensorflow as tf

    local = tmp_path / "data"
    for split, n, first in (("train", 24, 1), ("val", 8, 1000)):
        make_split(str(local), split, n, seed=3, first_id=first)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name in sorted(os.listdir(local / "val"))[:4]:
            z.write(local / "val" / name, f"inner/{name}")
        z.writestr("broken.jpg", b"not an image")
    gs = f"gs://{BUCKET}"
    upload(local, f"{gs}/data")
    with tf.io.gfile.GFile(f"{gs}/archives/val.zip", "wb") as f:
        f.write(archive.getvalue())
    feats, model, caps = f"{gs}/features", f"{gs}/model", f"{gs}/captions"

    for split in ("train", "val"):
        command(
            gcs,
            "beam_jobs.extract_features",
            *("--split", split, "--captions_json", f"{gs}/data/annotations/captions_{split}.json"),
            *("--images_dir", f"{gs}/data/{split}", "--output_dir", feats),
            *("--weights", "none", "--vocab_size", "40", "--batch_size", "8"),
            *ONE_WORKER,
        )
    manifest = read_json(f"{feats}/manifest.json")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 8}
    assert "vocab.txt" in names(f"{feats}/*")

    command(
        gcs,
        "model.train",
        *("--data_dir", feats, "--model_dir", model, "--preset", "tiny", "--epochs", "2"),
        *("--batch_size", "8", "--max_length", "12", "--verbose", "0"),
    )
    assert {"checkpoints", "logs", "export", "config.json"} <= set(
        n.rstrip("/") for n in tf.io.gfile.listdir(model)
    )
    assert names(f"{model}/logs/events.out.tfevents.*")
    assert {"captioner.keras", "vocab.txt", "manifest.json", "serving/"} <= set(
        tf.io.gfile.listdir(f"{model}/export")
    )

    command(
        gcs,
        "model.evaluate",
        *("--model", f"{model}/export", "--data_dir", feats, "--split", "val", "--plots", "2"),
    )
    assert read_json(f"{model}/eval/val/metrics.json")["split"] == "val"
    assert len(read_json(f"{model}/eval/val/predictions.json")) == 8
    assert len(names(f"{model}/eval/val/attention_*.png")) == 2

    command(
        gcs,
        "beam_jobs.caption_images",
        *("--model", f"{model}/export", "--input", f"{gs}/data/val"),
        *("--input", f"{gs}/archives/val.zip", "--output_dir", caps),
        *("--attention_dir", f"{caps}/attention", "--attention_plots", "3", "--batch_size", "4"),
        *WORKERS,
    )
    rows = parquet_rows(gcs, f"{BUCKET}/captions", "captions-")
    errors = parquet_rows(gcs, f"{BUCKET}/captions", "errors-")
    assert len(rows) == 8 + 4 and len(errors) == 1
    assert {r["uri"].split("!/")[0] for r in rows} == {f"{gs}/archives/val.zip"} | {
        f"{gs}/data/val/{n}" for n in os.listdir(local / "val")
    }
    assert errors[0]["uri"] == f"{gs}/archives/val.zip!/broken.jpg"
    assert len(names(f"{caps}/attention/*.png")) == 3
    assert read_json(f"{caps}/manifest.json")["counts"]["inputs"] == 13
    assert not [p for p in os.listdir(ROOT) if p.startswith("gs:")]
