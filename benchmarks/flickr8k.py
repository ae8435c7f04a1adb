"""Benchmark: caption quality on real photos (Flickr8k), with the project's own commands.

    python -m benchmarks.flickr8k --data ../shared/data/flickr8k [--out bench_out/flickr8k]
        [--weights inception-2015 none] [--epochs 10] [--runs NAME=FLAGS ...]

For each `--weights` it extracts the train (6,600) and val (491) splits once
(`beam_jobs.extract_features`), trains each run (`model.train`, defaults plus the run's
flags; a run may continue another's, as self-critical training does) and evaluates it
on val (`model.evaluate`) greedy and with beam 3, with and without repeat blocking, and
with beam 5, beside the blind baseline (the most frequent training caption). It prints
one table: BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100, PTB tokenizer and METEOR when
Java is there, as in the papers), the share of captions with a repeated trigram, the
share at the length limit, and distinct captions per image. A run that continues
another gets a line per decoding and per run it continues (directly, or through another:
`scst-e5:scst` after `scst:defaults` is compared with both): its CIDEr over the other's, with a 95% paired
bootstrap interval over the val images (on 491 images a ratio moves a few percent
either way). Each step is skipped when its output is already there, so a killed
benchmark continues where it stopped.

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
import json
import os
import shutil
import subprocess
import sys
import time

from model.evaluation.metrics import LOOPING_KEYS, METRIC_KEYS

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


def extract(data: str, features: str, weights: str, logs: str) -> None:
    manifest = os.path.join(features, "manifest.json")
    for split in ("train", "val"):
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
                os.path.join(data, "annotations", f"captions_{split}.json"),
                "--images_dir",
                images_dir(data, split),
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


def evaluate(features: str, model_dir: str, name: str, flags: list[str], log: str) -> dict:
    out = os.path.join(model_dir, "eval", name)
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        argv = ["--model", os.path.join(model_dir, "export"), "--data_dir", features]
        argv += ["--split", "val", "--output_dir", out, *flags]
        sh([sys.executable, "-m", "model.evaluate", *argv], log)
    with open(path) as f:
        return json.load(f)


def val_references(features: str) -> dict[int, list[str]]:
    """The val split's reference captions by image id, read from the features dir."""
    from model.quiet import import_tensorflow

    import_tensorflow()  # without its start-up lines
    from model.data.shards import check_data_dir, image_records, split_info

    manifest, _ = check_data_dir(features)
    refs: dict[int, list[str]] = {}
    for batch in image_records(split_info(features, manifest, "val").files, 512):
        for i, captions in zip(batch["image_id"].numpy(), batch["captions"].to_list(), strict=True):
            refs[int(i)] = [c.decode() for c in captions]
    return refs


def ratio_lines(
    features: str, pairs: list[tuple[str, str, str]], model_dirs: dict[str, str]
) -> list[str]:
    """For each (run, base run, decoding): CIDEr(run) / CIDEr(base) on val with its 95%
    paired bootstrap interval over the images (`model.evaluation.metrics.paired_ratio`)."""
    from model.evaluation.metrics import cider_per_image, java_available, paired_ratio

    refs = val_references(features)
    use_java = java_available()

    @functools.cache  # a base run is compared with each run that continues it
    def scores(name: str, decoding: str) -> list[float]:
        path = os.path.join(model_dirs[name], "eval", decoding, "predictions.json")
        with open(path) as f:
            preds = {p["image_id"]: p["caption"] for p in json.load(f)}
        return list(cider_per_image(refs, preds, use_java).values())

    lines = []
    for name, base, decoding in pairs:
        ratio, low, high = paired_ratio(scores(base, decoding), scores(name, decoding))
        lines.append(
            f"CIDEr {name} / {base}, {decoding}: x{ratio:.3f} "
            f"(95% paired bootstrap over {len(refs)} images: x{low:.3f} to x{high:.3f})"
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
        "--runs",
        nargs="+",
        default=["defaults="],
        help="NAME=FLAGS: model.train flags of each run, e.g. 'no-dropout=--dropout 0 "
        "--select_by loss' (the first run is also trained on the other --weights); "
        "NAME:BASE=FLAGS continues a copy of run BASE, e.g. 'scst:defaults=--scst_epochs 5'",
    )
    p.add_argument("--decodings", nargs="+", default=DEFAULT_DECODINGS, choices=list(DECODINGS))
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
    for w, weights in enumerate(args.weights):
        features = os.path.join(args.out, f"features-{weights}")
        extract(args.data, features, weights, logs)
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
            for decoding in args.decodings:
                log = f"{logs}/evaluate-{weights}-{name}.log"
                m = evaluate(features, model_dir, decoding, DECODINGS[decoding], log)
                rows[f"{weights} {name} {decoding}"] = m
                if BLIND not in rows and m.get("baseline"):
                    rows[BLIND] = m["baseline"]
        print(table(rows), flush=True)
        if w == 0 and pairs:
            print("\n".join(ratio_lines(features, pairs, model_dirs)), flush=True)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
