"""All three stages on FnApiRunner, checking each hand-off, as `make demo` runs them (smaller)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from beam_jobs import caption_images, extract_features
from model import evaluate, train
from model.datasets.make_shapes import make_split
from model.metrics import METRIC_KEYS

RUNNER = ["--runner", "FnApiRunner"]
SERVE = """
import json, sys
import tensorflow as tf
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
paths = sys.argv[2:]
out = fn(images=tf.constant([open(p, "rb").read() for p in paths]))
assert out["caption"].dtype == tf.string and out["token_ids"].dtype == tf.int32
assert not [m for m in sys.modules if m.split(".")[0] in ("model", "beam_jobs")]
print(json.dumps(dict(zip(paths, [c.decode() for c in out["caption"].numpy()]))))
"""


def serve_in_clean_process(saved_model, images):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", SERVE, str(saved_model), *map(str, images)],
        capture_output=True,
        text=True,
        env=env,
        cwd=saved_model,  # not the repository: its packages cannot be imported
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    captions = json.loads(r.stdout.strip().splitlines()[-1])
    return {os.path.basename(p): c for p, c in captions.items()}


def test_extract_train_evaluate_caption(tmp_path, capfd):
    data, feats, model_dir, caps = (tmp_path / d for d in ("data", "features", "model", "captions"))
    for split, n, first in (("train", 48, 1), ("val", 12, 1000)):
        make_split(str(data), split, n, seed=5, first_id=first)
        extract_features.run(
            [
                "--split",
                split,
                "--captions_json",
                str(data / "annotations" / f"captions_{split}.json"),
                "--images_dir",
                str(data / split),
                "--output_dir",
                str(feats),
                "--weights",
                "none",
                "--vocab_size",
                "60",
                "--batch_size",
                "16",
                *RUNNER,
            ]
        )
    manifest = json.load(open(feats / "manifest.json"))
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 48, "val": 12}

    summary = train.run(
        [
            "--data_dir",
            str(feats),
            "--model_dir",
            str(model_dir),
            "--preset",
            "tiny",
            "--epochs",
            "3",
            "--batch_size",
            "32",
            "--learning_rate",
            "5e-3",
            "--warmup_steps",
            "2",
            "--verbose",
            "0",
            "--max_length",
            "12",
        ]
    )
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    export = model_dir / "export"
    assert {"captioner.keras", "vocab.txt", "manifest.json"} <= set(os.listdir(export))

    result = evaluate.run(
        [
            "--model",
            str(export),
            "--data_dir",
            str(feats),
            "--split",
            "val",
            "--plots",
            "2",
        ]
    )
    metrics = json.load(open(model_dir / "eval" / "val" / "metrics.json"))
    assert all(k in metrics for k in METRIC_KEYS if k != "METEOR" or metrics["comparable"])
    assert len(json.load(open(model_dir / "eval" / "val" / "predictions.json"))) == 12
    assert len(result["plots"]) >= 1 and all(p.endswith(".png") for p in result["plots"])

    caption_images.run(
        [
            "--model",
            str(export),
            "--input",
            str(data / "val"),
            "--output_dir",
            str(caps),
            "--batch_size",
            "8",
            *RUNNER,
        ]
    )
    rows = pq.read_table(sorted(str(p) for p in caps.glob("captions-*.parquet"))).to_pylist()
    assert len(rows) == 12
    bulk = {os.path.basename(r["uri"]): r["caption"] for r in rows}
    from_features = {result["file_names"][i]: c for i, c in result["predictions"].items()}
    same = sum(bulk[name] == caption for name, caption in from_features.items())
    # Stage 3 computes features from raw images; evaluation decodes stage 1's float16 shards.
    assert same / len(from_features) >= 0.95, (bulk, from_features)

    # The serving SavedModel, loaded by a process that has none of this project's code.
    served = serve_in_clean_process(export / "serving", sorted((data / "val").glob("*.jpg")))
    assert served.keys() == bulk.keys()
    assert served == bulk  # decoding and resizing in the graph match PIL's to +-1 level

    # Beam search through both commands: recorded, and the same captions from both paths.
    beam = ["--beam_size", "3", "--length_penalty", "0.6"]
    beam_result = evaluate.run(
        ["--model", str(export), "--data_dir", str(feats), "--split", "val"]
        + ["--output_dir", str(tmp_path / "eval_beam"), *beam]
    )
    beam_metrics = json.load(open(tmp_path / "eval_beam" / "metrics.json"))
    assert beam_metrics["decoding"] == {
        "max_length": 12,
        "beam_size": 3,
        "length_penalty": 0.6,
        "allow_unk": False,
    }
    caption_images.run(
        ["--model", str(export), "--input", str(data / "val"), "--output_dir", str(tmp_path / "b")]
        + ["--batch_size", "8", *beam, *RUNNER]
    )
    assert json.load(open(tmp_path / "b" / "manifest.json"))["decoding"]["beam_size"] == 3
    beam_files = sorted(str(p) for p in (tmp_path / "b").glob("captions-*.parquet"))
    rows = pq.read_table(beam_files).to_pylist()
    bulk = {os.path.basename(r["uri"]): r["caption"] for r in rows}
    from_features = {beam_result["file_names"][i]: c for i, c in beam_result["predictions"].items()}
    same = sum(bulk[name] == caption for name, caption in from_features.items())
    assert same / len(from_features) >= 0.95, (bulk, from_features)
    # Quiet: progress lines and our own, nothing from Java's tokenizer or TF's start-up.
    err = capfd.readouterr().err
    assert "PTBTokenizer" not in err and "cuInit" not in err and "absl" not in err, err
