"""Prints bulk captions next to the reference captions of the same images.

python -m scripts.show_captions --captions_dir CAPTIONS_DIR --captions_json ANN.json [--count 8]
"""

from __future__ import annotations

import argparse
import json
import os

from deltalake import DeltaTable


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions_dir", required=True)
    p.add_argument("--captions_json", required=True, help="COCO captions file with the references")
    p.add_argument("--count", type=int, default=8)
    a = p.parse_args(argv)
    with open(a.captions_json) as f:
        coco = json.load(f)
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    refs: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        refs.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    table = DeltaTable(a.captions_dir).to_pyarrow_table(columns=["uri", "caption", "error_type"])
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    captioned = [r for r in rows if r["error_type"] is None]
    shown = [r for r in captioned if "!/" not in r["uri"]][: a.count]
    for r in shown:
        name = os.path.basename(r["uri"])
        print(f"{name}\n  model:     {r['caption']}\n  reference: {refs.get(name, ['?'])[0]}")
    failed = len(rows) - len(captioned)
    print(f"\n{len(captioned)} captions and {failed} error rows in {a.captions_dir}")


if __name__ == "__main__":
    main()
