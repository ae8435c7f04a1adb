"""The work behind `python -m model.evaluate` (see that module for the command):
decode a split, score it with the COCO metrics, write the results and plots.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any

import numpy as np
import tensorflow as tf

from model.cli import decoding_settings, empty_captions_warning
from model.data.shards import check_data_dir, image_records, records, split_info
from model.decoding.decoders import make_decoder, to_decoded
from model.evaluation.metrics import format_table, score_captions
from model.io import formats, storage
from model.network.captioner import ShowAttendTell
from model.network.export import Export, load_export
from model.text.ngrams import looping_figures
from model.text.vocab import Vocabulary, standardize


def check_compatible(
    export: Export, features_manifest: dict[str, Any], data_dir: str, any_precision: bool = False
) -> None:
    ignore = formats.COMPUTE_KEYS if any_precision else ()
    if diff := formats.features_mismatch(export.features, features_manifest, ignore):
        key, trained_on, found = diff
        raise formats.FormatError(
            f"{data_dir}: features have {key}={found!r} but the model was trained on {trained_on!r}"
        )


def decode_split(
    model: ShowAttendTell,
    vocab: Vocabulary,
    files: list[str],
    batch_size: int,
    max_length: int,
    decoding: dict[str, Any] | None = None,
    decode: Any = None,
) -> dict[str, Any]:
    """Captions for every image: ids, file names, captions, references, attention.
    `decode` (a `make_decoder` function) is traced here unless given."""
    decode = decode or make_decoder(model, max_length, **(decoding or {}))
    out: dict[str, list] = collections.defaultdict(list)
    for batch in image_records(files, batch_size):
        decoded = to_decoded(decode(batch["features"]))
        out["image_id"] += [int(i) for i in batch["image_id"].numpy()]
        out["file_name"] += [f.decode("utf-8") for f in batch["file_name"].numpy()]
        out["caption"] += decoded.captions(vocab)
        out["hit_max_length"] += [bool(h) for h in decoded.hit_max_length]
        out["references"] += [
            [c.decode("utf-8") for c in row] for row in batch["captions"].to_list()
        ]
        out["words"] += [
            [vocab.tokens[t] for t in decoded.words(i)]
            + ([] if decoded.hit_max_length[i] else ["<end>"])
            for i in range(len(decoded.lengths))
        ]
        out["attention"] += list(decoded.attention)
    return out


def most_frequent_caption(files: list[str]) -> str:
    """The blind baseline: the most frequent (standardised) training caption."""
    counts: collections.Counter[str] = collections.Counter()
    spec = {formats.KEY_CAPTIONS: tf.io.VarLenFeature(tf.string)}
    for batch in records(files, shuffle_files=False, seed=None).batch(512):
        caps = tf.io.parse_example(batch, spec)[formats.KEY_CAPTIONS].values.numpy()
        counts.update(standardize(c.decode("utf-8")) for c in caps)
    return counts.most_common(1)[0][0] if counts else ""


def write_plots(decoded: dict[str, Any], images_dir: str, out_dir: str, count: int) -> list[str]:
    from PIL import Image

    from model.evaluation.plot import plot_attention
    from model.images.preprocess import ImageError, decode_image

    paths = []
    for i in range(min(count, len(decoded["image_id"]))):
        words = decoded["words"][i]
        if not words:
            continue
        src = f"{images_dir.rstrip('/')}/{decoded['file_name'][i]}"
        try:
            image, _ = decode_image(storage.read_bytes(src))
        except (OSError, ImageError):
            print(f"evaluate: no plot for {src} (image not reachable)", file=sys.stderr)
            continue
        image.thumbnail((320, 320), Image.BILINEAR)
        path = os.path.join(out_dir, f"attention_{decoded['image_id'][i]}.png")
        plot_attention(image, words, decoded["attention"][i], path, title=decoded["caption"][i])
        paths.append(path)
    return paths


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    export = load_export(args.model)
    features_manifest, _ = check_data_dir(args.data_dir)
    check_compatible(export, features_manifest, args.data_dir, args.any_precision)
    info = split_info(args.data_dir, features_manifest, args.split)
    out_dir = args.output_dir or os.path.join(
        os.path.dirname(export.path.rstrip("/")), "eval", args.split
    )
    storage.makedirs(out_dir)
    max_length = args.max_length or export.max_length
    decoding = decoding_settings(args)
    decoded = decode_split(
        export.model, export.vocab, info.files, args.batch_size, max_length, decoding
    )
    ids = decoded["image_id"]
    refs = dict(zip(ids, decoded["references"], strict=True))
    preds = dict(zip(ids, decoded["caption"], strict=True))
    use_java = False if args.no_java else None
    metrics = score_captions(refs, preds, use_java)
    metrics.update(looping_figures(decoded["caption"], decoded["hit_max_length"]))
    results: dict[str, Any] = {"model": metrics}
    train_split = "train" if "train" in features_manifest.get("splits", {}) else None
    if train_split:
        blind = most_frequent_caption(
            split_info(args.data_dir, features_manifest, train_split).files
        )
        results["blind baseline"] = score_captions(
            refs, dict.fromkeys(ids, blind), metrics["comparable"]
        )
        results["blind baseline"]["caption"] = blind
        results["blind baseline"].update(looping_figures([blind] * len(ids), [False] * len(ids)))
    record = {
        **metrics,
        "split": args.split,
        "model_id": export.model_id,
        "decoding": {"max_length": max_length, **decoding},
        "baseline": results.get("blind baseline"),
    }
    storage.write_text(os.path.join(out_dir, "metrics.json"), json.dumps(record, indent=2))
    predictions = [{"image_id": i, "caption": preds[i]} for i in ids]
    storage.write_text(os.path.join(out_dir, "predictions.json"), json.dumps(predictions))
    how = "greedy" if decoding["beam_size"] == 1 else f"beam {decoding['beam_size']}"
    print(
        f"evaluate: {len(ids)} images of split {args.split!r}, model {export.model_id}, "
        f"{how} decoding"
    )
    print(format_table(results))
    if not metrics["comparable"]:
        why = "--no_java" if args.no_java else "Java not found"
        print(f"evaluate: {why}: Python tokenizer and no METEOR; not comparable with papers")
    if warning := empty_captions_warning(sum(not c for c in decoded["caption"]), len(ids)):
        print(f"evaluate: {warning}", file=sys.stderr)
    plots = []
    if args.plots:
        images_dir = args.images_dir or features_manifest["splits"][args.split].get("images_dir")
        if images_dir:
            plots = write_plots(decoded, images_dir, out_dir, args.plots)
        for p in plots:
            print(f"evaluate: attention plot {p}")
    print(f"evaluate: wrote {out_dir}/metrics.json and predictions.json")
    return {
        "metrics": metrics,
        "results": results,
        "output_dir": out_dir,
        "plots": plots,
        "predictions": preds,
        "file_names": dict(zip(ids, decoded["file_name"], strict=True)),
        "attention_sum": float(np.sum([a.sum() for a in decoded["attention"]])),
    }
