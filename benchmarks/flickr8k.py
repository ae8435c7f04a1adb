"""Benchmark: caption quality on real photos (Flickr8k), with the project's own commands.

    python -m benchmarks.flickr8k --data ../shared/data/flickr8k [--out bench_out/flickr8k]
        [--weights inception-2015 none] [--epochs 10] [--runs NAME=FLAGS ...]

A test split is held out of the train photos by a hash of the file name (1 in
`--test_every`, about 510 of Flickr8k's 6,600; a data folder with its own
`captions_test.json` keeps it): neither training nor the choice of epoch sees it, while
val (491) picks each run's epoch. For each `--weights` it extracts the three splits once
(`beam_jobs.extract_features`), trains each run (`model.train`, defaults plus the run's
flags; a run may continue another's, as self-critical training does) and evaluates it
on test and on val (`model.evaluate`) greedy and with beam 3, with and without repeat
blocking, and with beam 5, beside the blind baseline (the most frequent training
caption). It prints
one table: BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100, PTB tokenizer and METEOR when
Java is there, as in the papers), the share of captions with a repeated trigram, the
share at the length limit, and distinct captions per image. A run that continues
another gets a line per decoding and per run it continues (directly, or through another:
`scst-e5:scst` after `scst:defaults` is compared with both): its CIDEr over the other's, with a 95% paired
bootstrap interval over the images, on test and on val (on 500 images a ratio moves a
few percent either way). Each step is skipped when its output is already there, so a killed
benchmark continues where it stopped.

`--runtimes` (default openvino/float32 and openvino/int8) extracts the eval splits again
with each runtime and precision (int8: an encoder calibrated on 300 train photos by
`model.images.calibrate`) and captions them with the first run's model, trained on
TensorFlow float32 features (`model.evaluate --any_precision`): a row each, and a line
per decoding with CIDEr over TensorFlow float32's (95% paired bootstrap) and the share
of identical captions.

Any COCO-format folder laid out as Flickr8k is (or as `demo.make_shapes` writes it, a
folder of images per split) works: `--data` of `python -m demo.make_shapes OUT --mode
hard` measures the synthetic data where cross-entropy alone plateaus.

The Flickr8k photos are for research use only: they are read where they are and
never copied. About 15 minutes to extract each weights variant and 2 minutes an
epoch on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from model.evaluation.metrics import LOOPING_KEYS, METRIC_KEYS
from model.io.formats import features_vocab_path

DECODINGS = {
    "greedy": ["--block_repeats", "0"],
    "greedy+block2": ["--block_repeats", "2"],
    "greedy+block3": ["--block_repeats", "3"],
    "greedy+block4": ["--block_repeats", "4"],
    "beam3": ["--beam_size", "3", "--block_repeats", "0"],
    "beam3+block3": ["--beam_size", "3", "--block_repeats", "3"],
    "beam5+block3": ["--beam_size", "5", "--block_repeats", "3"],
}
# Without --decodings: the four that show what blocking buys, greedy and beam.
DEFAULT_DECODINGS = ["greedy", "greedy+block3", "beam3", "beam3+block3", "beam5+block3"]


BLIND = "blind (most frequent caption)"


def sh(argv: list[str], log: str) -> None:
    """Runs one of the project's commands, its output into `log`; fails loudly."""
    started = time.perf_counter()
    print(f"flickr8k: {' '.join(argv[2:4])} ... (log: {log})", flush=True)
    with open(log, "a") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"flickr8k: {' '.join(argv)} failed; see {log}")
    print(f"flickr8k:   {time.perf_counter() - started:.0f} s", flush=True)


def images_dir(data: str, split: str) -> str:
    """Flickr8k keeps every photo in Images/; `demo.make_shapes` a folder per split."""
    shared = os.path.join(data, "Images")
    return shared if os.path.isdir(shared) else os.path.join(data, split)


SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("test", "val")


def held_out(file_name: str, every: int) -> bool:
    """Whether a train photo goes to the test split: 1 in `every`, by its name's hash."""
    return int(hashlib.sha256(file_name.encode()).hexdigest(), 16) % every == 0


def split_annotations(data: str, out: str, every: int) -> dict[str, str]:
    """split -> its COCO captions file. The test split comes from the data folder when it
    has one, else from the train photos `held_out` (both files written once into `out`:
    captions only, the photos stay where they are)."""
    given = {s: os.path.join(data, "annotations", f"captions_{s}.json") for s in SPLITS}
    if os.path.exists(given["test"]):
        return given
    derived = {s: os.path.join(out, "annotations", f"captions_{s}.json") for s in ("train", "test")}
    if not all(os.path.exists(p) for p in derived.values()):
        with open(given["train"]) as f:
            coco = json.load(f)
        test_ids = {im["id"] for im in coco["images"] if held_out(im["file_name"], every)}
        os.makedirs(os.path.dirname(derived["train"]), exist_ok=True)
        for split, keep in (("train", False), ("test", True)):
            part = {
                **coco,
                "images": [im for im in coco["images"] if (im["id"] in test_ids) == keep],
                "annotations": [
                    a for a in coco["annotations"] if (a["image_id"] in test_ids) == keep
                ],
            }
            with open(derived[split] + ".tmp", "w") as f:
                json.dump(part, f)
            os.replace(derived[split] + ".tmp", derived[split])
    return {**given, **derived}


def extract(data: str, features: str, weights: str, logs: str, captions: dict[str, str]) -> None:
    manifest = os.path.join(features, "manifest.json")
    for split in SPLITS:
        if os.path.exists(manifest):
            with open(manifest) as f:
                if split in json.load(f).get("splits", {}):
                    continue
        sh(
            [
                sys.executable,
                "-m",
                "beam_jobs.extract_features",
                "--split",
                split,
                "--captions_json",
                captions[split],
                "--images_dir",
                images_dir(data, "train" if split == "test" else split),
                "--output_dir",
                features,
                "--weights",
                weights,
                "--runner",
                "FnApiRunner",
            ],
            os.path.join(logs, f"extract-{weights}.log"),
        )


def train(
    features: str, model_dir: str, epochs: int, flags: list[str], log: str, base: str = ""
) -> None:
    """Trains one run; with `base`, continues a copy of that run's MODEL_DIR (its
    checkpoints, config and best epoch), e.g. self-critical epochs after its CE ones."""
    if os.path.exists(os.path.join(model_dir, "export", "manifest.json")):
        return
    if base and not os.path.exists(model_dir):
        shutil.copytree(base, model_dir, ignore=shutil.ignore_patterns("export", "eval", ".lock"))
    argv = ["--data_dir", features, "--model_dir", model_dir, "--epochs", str(epochs)]
    sh([sys.executable, "-m", "model.train", *argv, "--no_serving_export", *flags], log)


def evaluate(
    features: str, model_dir: str, split: str, name: str, flags: list[str], log: str
) -> dict:
    out = os.path.join(model_dir, "eval", split, name)
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        argv = ["--model", os.path.join(model_dir, "export"), "--data_dir", features]
        argv += ["--split", split, "--output_dir", out, *flags]
        sh([sys.executable, "-m", "model.evaluate", *argv], log)
    with open(path) as f:
        return json.load(f)


def references(features: str, split: str) -> dict[int, list[str]]:
    """A split's reference captions by image id, read from the features dir."""
    from model.quiet import import_tensorflow

    import_tensorflow()  # without its start-up lines
    from model.data.shards import check_data_dir, image_records, split_info

    manifest, _ = check_data_dir(features)
    refs: dict[int, list[str]] = {}
    for batch in image_records(split_info(features, manifest, split).files, 512):
        for i, captions in zip(batch["image_id"].numpy(), batch["captions"].to_list(), strict=True):
            refs[int(i)] = [c.decode() for c in captions]
    return refs


def ratio_lines(
    features: str, split: str, pairs: list[tuple[str, str, str]], model_dirs: dict[str, str]
) -> list[str]:
    """For each (run, base run, decoding): CIDEr(run) / CIDEr(base) on `split` with its
    95% paired bootstrap interval over the images (`model.evaluation.metrics.paired_ratio`)."""
    from model.evaluation.metrics import cider_per_image, java_available, paired_ratio

    refs = references(features, split)
    use_java = java_available()

    @functools.cache  # a base run is compared with each run that continues it
    def scores(name: str, decoding: str) -> list[float]:
        path = os.path.join(model_dirs[name], "eval", split, decoding, "predictions.json")
        with open(path) as f:
            preds = {p["image_id"]: p["caption"] for p in json.load(f)}
        return list(cider_per_image(refs, preds, use_java).values())

    lines = []
    for name, base, decoding in pairs:
        ratio, low, high = paired_ratio(scores(base, decoding), scores(name, decoding))
        lines.append(
            f"CIDEr {name} / {base}, {decoding}, {split}: x{ratio:.3f} "
            f"(95% paired bootstrap over {len(refs)} images: x{low:.3f} to x{high:.3f})"
        )
    return lines


def calibrated_encoder(data: str, out: str, weights: str, train_json: str, logs: str) -> str:
    """The int8 encoder of `weights`, calibrated (`model.images.calibrate`) on 300 train
    photos, linked (not copied) into a folder of their own."""
    from model.images.calibrate import pick_images

    folder = os.path.join(out, f"int8-{weights}")
    if os.path.exists(os.path.join(folder, "calibration.json")):
        return folder
    with open(train_json) as f:
        names = [im["file_name"] for im in json.load(f)["images"]]
    photos = os.path.join(out, "calibration-photos")
    os.makedirs(photos, exist_ok=True)
    for name in pick_images(names, 300):
        link = os.path.join(photos, os.path.basename(name))
        if not os.path.exists(link):
            os.link(os.path.join(images_dir(data, "train"), name), link)
    argv = ["--weights", weights, "--images", photos, "--output", folder, "--count", "300"]
    sh([sys.executable, "-m", "model.images.calibrate", *argv], os.path.join(logs, "calibrate.log"))
    return folder


def runtime_features(
    data: str, out: str, features: str, weights: str, spec: str, logs: str, captions: dict
) -> str:
    """The eval splits' features computed by another runtime/precision (`spec`, e.g.
    openvino/int8), with the vocabulary of `features`."""
    runtime, precision = spec.split("/")
    folder = os.path.join(out, f"features-{weights}-{runtime}-{precision}")
    flags = ["--runtime", runtime, "--precision", precision]
    if precision == "int8":
        flags += ["--calibration", calibrated_encoder(data, out, weights, captions["train"], logs)]
    for split in EVAL_SPLITS:
        manifest = os.path.join(folder, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                if split in json.load(f).get("splits", {}):
                    continue
        argv = ["--split", split, "--captions_json", captions[split], "--weights", weights]
        argv += ["--images_dir", images_dir(data, "train" if split == "test" else split)]
        with open(os.path.join(features, "manifest.json")) as f:
            vocab = features_vocab_path(features, json.load(f))
        argv += ["--output_dir", folder, "--vocab", vocab]
        argv += [*flags, "--runner", "FnApiRunner"]
        sh(
            [sys.executable, "-m", "beam_jobs.extract_features", *argv],
            f"{logs}/extract-{spec.replace('/', '-')}.log",
        )
    return folder


def runtime_lines(
    features: str, split: str, model_dir: str, spec: str, decodings: list[str]
) -> list[str]:
    """CIDEr of the same model's captions from `spec`'s features over those from
    TensorFlow float32's, with its 95% paired bootstrap interval, and the share of
    identical captions."""
    from model.evaluation.metrics import cider_per_image, java_available, paired_ratio

    refs = references(features, split)
    lines = []
    for decoding in decodings:
        preds = {}
        for name in (decoding, f"{decoding}@{spec.replace('/', '-')}"):
            with open(os.path.join(model_dir, "eval", split, name, "predictions.json")) as f:
                preds[name] = {p["image_id"]: p["caption"] for p in json.load(f)}
        base, other = preds.values()
        same = sum(base[i] == other.get(i) for i in base) / len(base)
        scores = [list(cider_per_image(refs, p, java_available()).values()) for p in (base, other)]
        ratio, low, high = paired_ratio(*scores)
        lines.append(
            f"CIDEr {spec} / tensorflow float32 features, same model, {decoding}, {split}: "
            f"x{ratio:.3f} (95% paired bootstrap: x{low:.3f} to x{high:.3f}); "
            f"{same:.0%} identical captions"
        )
    return lines


def ancestors(name: str, bases: dict[str, str]) -> list[str]:
    """The runs `name` continues, nearest first: its base, its base's base, ... (those
    in `bases`, the runs of this benchmark)."""
    chain: list[str] = []
    while (name := bases.get(name, "")) in bases and name not in chain:
        chain.append(name)
    return chain


def table(rows: dict[str, dict]) -> str:
    keys = (*METRIC_KEYS, *LOOPING_KEYS)
    short = ["B1", "B2", "B3", "B4", "METEOR", "ROUGE_L", "CIDEr", "loops%", "limit%", "distinct%"]
    width = max(len(n) for n in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{s:>9}" for s in short)]
    for name, m in rows.items():
        cells = [m.get(k) for k in keys]
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{c * 100:>9.1f}" if c is not None else f"{'-':>9}" for c in cells)
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the Flickr8k folder (Images/, annotations/)")
    p.add_argument("--out", default="bench_out/flickr8k")
    p.add_argument("--weights", nargs="+", default=["inception-2015", "none"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--test_every",
        type=int,
        default=13,
        help="hold 1 in N train photos out as the test split (by a hash of the file name)",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=["defaults="],
        help="NAME=FLAGS: model.train flags of each run, e.g. 'no-dropout=--dropout 0 "
        "--select_by loss' (the first run is also trained on the other --weights); "
        "NAME:BASE=FLAGS continues a copy of run BASE, e.g. 'scst:defaults=--scst_epochs 5'",
    )
    p.add_argument("--decodings", nargs="+", default=DEFAULT_DECODINGS, choices=list(DECODINGS))
    p.add_argument(
        "--runtimes",
        nargs="*",
        default=["openvino/float32", "openvino/int8"],
        help="RUNTIME/PRECISION: the first run (on the first --weights) also captions the "
        "eval splits from features these compute (int8: calibrated on 300 train photos)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    runs = [r.split("=", 1) for r in args.runs]
    rows: dict[str, dict] = {}
    pairs: list[tuple[str, str, str]] = []  # (run, a run it continues, decoding)
    model_dirs: dict[str, str] = {}
    bases: dict[str, str] = {}
    captions = split_annotations(args.data, args.out, args.test_every)
    for w, weights in enumerate(args.weights):
        features = os.path.join(args.out, f"features-{weights}")
        extract(args.data, features, weights, logs, captions)
        for spec, flags in runs if w == 0 else runs[:1]:
            name, _, base = spec.partition(":")
            model_dir = os.path.join(args.out, f"model-{weights}-{name}")
            base_dir = os.path.join(args.out, f"model-{weights}-{base}") if base else ""
            log = f"{logs}/train-{name}.log"
            train(features, model_dir, args.epochs, flags.split(), log, base_dir)
            model_dirs[name] = model_dir
            bases[name] = base
            if w == 0:  # against each run it continues, directly or not, that was evaluated
                pairs += [(name, a, d) for a in ancestors(name, bases) for d in args.decodings]
            for split in EVAL_SPLITS:
                for decoding in args.decodings:
                    log = f"{logs}/evaluate-{weights}-{name}.log"
                    m = evaluate(features, model_dir, split, decoding, DECODINGS[decoding], log)
                    rows[f"{weights} {name} {decoding} {split}"] = m
                    if f"{BLIND} {split}" not in rows and m.get("baseline"):
                        rows[f"{BLIND} {split}"] = m["baseline"]
        first_dir = model_dirs[runs[0][0].partition(":")[0]]
        for spec in args.runtimes if w == 0 else ():
            other = runtime_features(args.data, args.out, features, weights, spec, logs, captions)
            for split in EVAL_SPLITS:
                for decoding in args.decodings:
                    name = f"{decoding}@{spec.replace('/', '-')}"
                    flags = [*DECODINGS[decoding], "--any_precision"]
                    m = evaluate(
                        other,
                        first_dir,
                        split,
                        name,
                        flags,
                        f"{logs}/evaluate-{spec.replace('/', '-')}.log",
                    )
                    rows[f"{weights} {runs[0][0]} {decoding} {split} @{spec}"] = m
        print(table(rows), flush=True)
        for split in EVAL_SPLITS if w == 0 and pairs else ():
            print("\n".join(ratio_lines(features, split, pairs, model_dirs)), flush=True)
        for spec in args.runtimes if w == 0 else ():
            for split in EVAL_SPLITS:
                lines = runtime_lines(features, split, first_dir, spec, args.decodings)
                print("\n".join(lines), flush=True)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
