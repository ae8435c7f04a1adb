"""Prints the COCO metrics of several evaluations side by side (e.g. greedy against beam 3).

python -m scripts.compare_metrics greedy=EVAL_DIR/metrics.json "beam 3"=EVAL_BEAM_DIR/metrics.json

Each argument is NAME=PATH to a metrics.json written by `model.evaluate`; the
blind baseline of the first file is added as the last column.
"""

from __future__ import annotations

import argparse
import json

from model.evaluation.metrics import format_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="NAME=METRICS_JSON")
    a = p.parse_args(argv)
    columns: dict[str, dict] = {}
    baseline = None
    for spec in a.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            p.error(f"expected NAME=PATH, got {spec!r}")
        with open(path) as f:
            metrics = json.load(f)
        columns[name] = metrics
        baseline = baseline or metrics.get("baseline")
    if baseline:
        columns["blind baseline"] = baseline
    print(format_table(columns))


if __name__ == "__main__":
    main()
