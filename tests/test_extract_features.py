import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from beam_jobs.extract_features import run
from demo.make_shapes import make_split
from model.cli import UsageError
from model.data.shards import check_data_dir, image_records, split_info
from model.io import formats
from model.io.formats import FormatError
from model.text.vocab import RESERVED, Vocabulary
from tests.helpers import bad_images

RUNNER = ["--runner", "FnApiRunner"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """12 good train images, 3 val, plus broken and missing files listed in the annotations."""
    root = tmp_path_factory.mktemp("coco")
    ann_path = make_split(str(root), "train", 12, seed=1)
    make_split(str(root), "val", 3, seed=1, first_id=100)
    data = json.load(open(ann_path))
    expected_errors = {}
    for k, (name, (payload, kind)) in enumerate(sorted(bad_images().items())):
        (root / "train" / name).write_bytes(payload)
        data["images"].append({"id": 500 + k, "file_name": name})
        data["annotations"].append({"id": 9000 + k, "image_id": 500 + k, "caption": "broken"})
        expected_errors[name] = kind
    data["images"].append({"id": 600, "file_name": "missing.jpg"})
    expected_errors["missing.jpg"] = "missing_file"
    (root / "train" / "adir.jpg").mkdir()  # a folder where an image is listed
    data["images"].append({"id": 601, "file_name": "adir.jpg"})
    expected_errors["adir.jpg"] = "not_a_file"
    data["annotations"].append({"id": 9999, "image_id": 424242, "caption": "orphan caption"})
    for k, wordless in enumerate(["", " ... !", None, "\u00a0\u3000"]):  # dropped, counted
        data["annotations"].append({"id": 8000 + k, "image_id": 1, "caption": wordless})
    json.dump(data, open(ann_path, "w"))
    return root, expected_errors


def extract(root, out, split, *extra, weights="none"):
    """Stage 1 on the fixture's split; `weights` None leaves --weights out."""
    return run(
        [
            "--split",
            split,
            "--captions_json",
            str(root / "annotations" / f"captions_{split}.json"),
            "--images_dir",
            str(root / split),
            "--output_dir",
            str(out),
            *(["--weights", weights] if weights else []),
            "--batch_size",
            "4",
            *RUNNER,
            *extra,
        ]
    )


def read_split(out, split):
    manifest, vocab = check_data_dir(str(out))
    info = split_info(str(out), manifest, split)
    rows = []
    for batch in image_records(info.files, 8):
        for i in range(len(batch["image_id"])):
            rows.append(
                {
                    "id": int(batch["image_id"][i]),
                    "features": batch["features"][i].numpy(),
                    "captions": [c.decode() for c in batch["captions"][i].numpy()],
                }
            )
    return manifest, vocab, info, rows


@pytest.fixture(scope="module")
def extracted(coco, tmp_path_factory):
    root, _ = coco
    out = tmp_path_factory.mktemp("features")
    summary = extract(root, out, "train", "--num_shards", "2")
    return out, summary


def test_shards_hold_one_float16_example_per_image(extracted, coco):
    out, summary = extracted
    manifest, vocab, info, rows = read_split(out, "train")
    assert len(info.files) == 2 and all(f.endswith("-of-00002.tfrecord.gz") for f in info.files)
    assert sorted(r["id"] for r in rows) == list(range(1, 13))
    assert all(r["features"].shape == (64, 2048) for r in rows)
    assert all(len(r["captions"]) == 5 for r in rows)
    raw = next(iter(tf.data.TFRecordDataset(info.files[0], compression_type="GZIP")))
    parsed = formats.parse_example(raw.numpy())
    assert parsed["features"].dtype == np.float16 and np.isfinite(parsed["features"]).all()
    assert (parsed["width"], parsed["height"]) == (160, 120)
    assert summary["embedded"] == 12


def vocab_path(out):
    """FEATURES_DIR's vocabulary, as its manifest names it."""
    return formats.features_vocab_path(str(out), json.load(open(out / "manifest.json")))


def test_manifest_counts_every_image(extracted, coco):
    out, _ = extracted
    _, expected_errors = coco
    m = json.load(open(out / "manifest.json"))
    train = m["splits"]["train"]
    assert train["images"] == 12 and train["captions"] == 60
    assert train["errors"] == len(expected_errors)
    assert train["orphan_annotations"] == 1
    assert train["dropped_captions"] == 4  # and every stored image keeps its 5 real captions
    assert train["images"] + train["errors"] == 12 + len(expected_errors)  # nothing dropped
    assert (m["weights"], m["feature_dtype"], m["feature_shape"]) == ("none", "float16", [64, 2048])


def test_every_bad_file_is_an_error_row_with_its_reason(extracted, coco):
    out, _ = extracted
    _, expected = coco
    [name] = json.load(open(out / "manifest.json"))["splits"]["train"]["errors_files"]
    errors = pq.read_table(out / name).to_pylist()
    got = {os.path.basename(r["uri"]): r["error_type"] for r in errors}
    assert got == expected
    assert all(r["message"] for r in errors)


def test_vocabulary_is_built_from_train_in_frequency_order(extracted, coco):
    out, _ = extracted
    root, _ = coco
    vocab = Vocabulary.load(vocab_path(out))
    assert vocab.tokens[:4] == RESERVED
    data = json.load(open(root / "annotations" / "captions_train.json"))
    expected = Vocabulary.build(
        [
            a["caption"]
            for a in data["annotations"]
            if a["image_id"] != 424242 and isinstance(a["caption"], str)
        ],
        5000,
    )
    assert vocab == expected


def test_val_run_reuses_vocab_and_merges_manifest(extracted, coco, capsys):
    """Without --weights, a split added to FEATURES_DIR takes the weights (and precision)
    its manifest records: `none` here, not a download of `imagenet`."""
    out, _ = extracted
    root, _ = coco
    before = open(vocab_path(out)).read()
    extract(root, out, "val", weights=None)
    said = "--weights none, --precision float32 and --runtime tensorflow from"
    assert said in capsys.readouterr().out
    m = json.load(open(out / "manifest.json"))
    assert set(m["splits"]) == {"train", "val"} and m["splits"]["val"]["images"] == 3
    assert open(vocab_path(out)).read() == before


def test_val_without_vocabulary_fails_at_start(coco, tmp_path):
    root, _ = coco
    with pytest.raises(UsageError, match="no vocabulary for split val"):
        extract(root, tmp_path / "empty", "val")


def test_other_weights_in_same_dir_fail_at_start(extracted, coco, tmp_path):
    out, _ = extracted
    root, _ = coco
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"x")
    with pytest.raises(UsageError, match="holds features with weights_hash=None"):
        extract(root, out, "val", "--weights", str(weights))


def test_another_precision_in_same_dir_fails_at_start(extracted, coco):
    """bfloat16 val features beside float32 train features would train and evaluate on
    numbers of two kinds, and the caption job would default to the wrong one."""
    out, _ = extracted
    root, _ = coco
    with pytest.raises(UsageError, match="holds features with precision='float32'"):
        extract(root, out, "val", "--precision", "bfloat16")


@pytest.mark.parametrize("sharing", [["--model_copies", "2"], ["--large_model"]])
def test_multi_processing_mode_gives_the_same_features(extracted, coco, tmp_path, sharing):
    """Worker processes sharing models through Beam's proxy, which forwards method
    calls only: the same features as in-process."""
    out, _ = extracted
    root, _ = coco
    extract(
        root,
        tmp_path / "mp",
        "train",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        *sharing,
    )
    _, _, _, rows_mp = read_split(tmp_path / "mp", "train")
    _, _, _, rows = read_split(out, "train")
    by_id = {r["id"]: r["features"] for r in rows}
    assert sorted(by_id) == sorted(r["id"] for r in rows_mp)
    for r in rows_mp:
        np.testing.assert_allclose(r["features"], by_id[r["id"]], rtol=1e-2, atol=1e-6)


def test_karpathy_split_file(coco, tmp_path):
    root, _ = coco
    images = []
    for k, (split, sub) in enumerate(
        [("train", "train"), ("restval", "train"), ("val", "val"), ("test", "val")]
    ):
        data = json.load(open(root / "annotations" / f"captions_{sub}.json"))
        img = data["images"][k % 3]
        images.append(
            {
                "filepath": sub,
                "filename": img["file_name"],
                "cocoid": img["id"] + 1000 * k,
                "split": split,
                "sentences": [{"raw": "A red thing.", "tokens": ["a", "red", "thing"]}],
            }
        )
    kfile = tmp_path / "dataset_coco.json"
    kfile.write_text(json.dumps({"images": images, "dataset": "coco"}))
    run(
        [
            "--karpathy_json",
            str(kfile),
            "--images_dir",
            str(root),
            "--output_dir",
            str(tmp_path / "k"),
            "--weights",
            "none",
            *RUNNER,
        ]
    )
    m = json.load(open(tmp_path / "k" / "manifest.json"))
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert Vocabulary.load(vocab_path(tmp_path / "k")).tokens[4:] == ("a", "red", "thing")


def test_pipeline_translates_for_dataflow(coco, tmp_path):
    root, _ = coco
    summary = run(
        [
            "--split",
            "train",
            "--captions_json",
            str(root / "annotations" / "captions_train.json"),
            "--images_dir",
            str(root / "train"),
            "--output_dir",
            str(tmp_path / "out"),
            "--weights",
            "none",
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
        ]
    )
    assert summary == {"dry_run": True}
    assert not list((tmp_path / "out").glob("*.tfrecord.gz"))  # nothing ran


def test_reextracting_a_split_replaces_its_shards_and_training_reads_only_them(
    tmp_path_factory, tmp_path
):
    """10 images written as 2 shards, then as 3: the manifest lists the 3, the 2 are
    gone, and one training epoch reads each image once (steps == steps_per_epoch)."""
    from model import train

    root = tmp_path_factory.mktemp("reextract")
    make_split(str(root), "train", 10, seed=2)
    out = tmp_path / "features"
    extract(root, out, "train", "--num_shards", "2")
    extract(root, out, "train", "--num_shards", "3")
    manifest = json.load(open(out / "manifest.json"))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 3
    assert sorted(p for p in os.listdir(out) if p.startswith("train-")) == shards
    _, _, info, rows = read_split(out, "train")
    assert len(info.files) == 3 and len(rows) == 10
    summary = train.run(
        ["--data_dir", str(out), "--model_dir", str(tmp_path / "m"), "--preset", "tiny"]
        + ["--epochs", "1", "--batch_size", "4", "--verbose", "0", "--no_serving_export"]
    )
    assert summary["steps"] == summary["steps_per_epoch"]


def test_a_shard_the_manifest_lists_but_is_gone_fails_in_one_line(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("gone")
    make_split(str(root), "train", 4, seed=2)
    out = tmp_path / "features"
    extract(root, out, "train", "--num_shards", "2")
    shard = json.load(open(out / "manifest.json"))["splits"]["train"]["shards"][0]
    os.remove(out / shard)
    with pytest.raises(formats.FormatError, match=f"{shard}.*missing"):
        read_split(out, "train")


def test_a_killed_reextraction_leaves_a_manifest_that_tells_the_truth(tmp_path_factory, tmp_path):
    """12 images extracted, then the same FEATURES_DIR re-extracted from 4 other images
    with another vocabulary, SIGKILLed once its first shard is written (before its
    manifest): the manifest still names exactly what is there (its shards hold the
    counts it says, its vocabulary is the one it was built with), and the rerun replaces
    it all, leaving no file of the earlier runs and no beam-temp folder."""
    import signal
    import subprocess
    import sys
    import time

    from tests.test_cli import ENV, ROOT

    root = tmp_path_factory.mktemp("killed")
    make_split(str(root / "a"), "train", 12, seed=3)
    make_split(str(root / "b"), "train", 4, seed=5)
    data = json.load(open(root / "b" / "annotations" / "captions_train.json"))
    for i, a in enumerate(data["annotations"]):
        a["caption"] = f"zebra number {i} grazes"  # another vocabulary
    json.dump(data, open(root / "b" / "annotations" / "captions_train.json", "w"))
    out = tmp_path / "features"
    extract(root / "a", out, "train", "--num_shards", "2")
    before = json.load(open(out / "manifest.json"))
    vocab_before = open(vocab_path(out)).read()

    def consistent():
        manifest, vocab = check_data_dir(str(out))
        info = split_info(str(out), manifest, "train")
        count = sum(1 for _ in tf.data.TFRecordDataset(info.files, compression_type="GZIP"))
        assert count == info.images
        return manifest, vocab

    cmd = [sys.executable, "-m", "beam_jobs.extract_features", "--split", "train"]
    cmd += ["--captions_json", str(root / "b" / "annotations" / "captions_train.json")]
    cmd += ["--images_dir", str(root / "b" / "train"), "--output_dir", str(out)]
    cmd += ["--weights", "none", "--num_shards", "1", *RUNNER]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not [p for p in os.listdir(out) if p.startswith("train-") and "-of-00001" in p]:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest, _ = consistent()
    if manifest == before:  # killed before its commit, as nearly always
        assert manifest["splits"]["train"]["images"] == 12
        assert open(vocab_path(out)).read() == vocab_before
    extract(root / "b", out, "train", "--num_shards", "1")
    manifest, vocab = consistent()
    assert manifest["splits"]["train"]["images"] == 4 and "zebra" in vocab.tokens
    named = {
        *manifest["splits"]["train"]["shards"],
        *manifest["splits"]["train"]["errors_files"],
        manifest["vocab"]["file"],
        "manifest.json",
    }
    assert set(os.listdir(out)) - {".lock"} == named


def test_an_image_id_given_to_two_files_fails_at_start(tmp_path):
    """COCO captions name their image by id only: with id 1 on two files, the second
    would silently get the first one's captions. The same entry twice is harmless."""
    from beam_jobs.annotations import parse_file

    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]
    coco = {"images": images, "annotations": [{"image_id": 1, "caption": "a dog"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(FormatError, match="image id 1 is given to two images"):
        parse_file(str(path), karpathy=False, split="train")
    coco["images"] = [images[0], images[0]]
    path.write_text(json.dumps(coco))
    (record,) = parse_file(str(path), karpathy=False, split="train").records
    assert record.captions == ("a dog",)
