"""Caption annotation files to per-image records: COCO captions JSON and the Karpathy split.

Pure functions over parsed JSON, so the launcher can validate and count at
start and the pipeline can re-read the same file on a worker.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from model.io.formats import FormatError
from model.text.vocab import tokenize

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class ImageRecord:
    """One image and all of its reference captions."""

    image_id: int
    file_name: str  # relative to --images_dir
    captions: tuple[str, ...]
    split: str


@dataclass(frozen=True)
class Parsed:
    records: list[ImageRecord]
    orphan_annotations: int  # captions whose image id is not in the file's image list
    # Per split: captions without a word (empty, punctuation only, null, not text),
    # which would otherwise train as `<start> <end>`.
    dropped_captions: dict[str, int] = field(default_factory=dict)


def clean_caption(raw: Any) -> str | None:
    """The caption, stripped; None when it has no word to train on."""
    if not isinstance(raw, str) or not tokenize(raw):
        return None
    return raw.strip()


def _clean_all(raws: Iterable[Any], split: str, dropped: Counter[str]) -> tuple[str, ...]:
    kept = tuple(c for c in map(clean_caption, raws) if c is not None)
    dropped[split] += 0  # every split appears, with 0 when nothing was dropped
    return kept


def load_json(path: str) -> Any:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except OSError as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            raise FileNotFoundError(f"annotation file not found: {path}") from None
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def parse_coco(data: dict[str, Any], split: str) -> Parsed:
    """COCO captions format: {"images": [{id, file_name}], "annotations": [{image_id, caption}]}."""
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError("not a COCO captions file: needs 'images' and 'annotations'")
    captions: dict[int, list[Any]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[int(ann["image_id"])].append(ann["caption"])
    known = {int(img["id"]) for img in data["images"]}
    orphans = sum(len(c) for i, c in captions.items() if i not in known)
    dropped: Counter[str] = Counter()
    records = []
    for img in sorted(data["images"], key=lambda i: int(i["id"])):
        raws = captions.get(int(img["id"]), [])
        kept = _clean_all(raws, split, dropped)
        dropped[split] += len(raws) - len(kept)
        records.append(ImageRecord(int(img["id"]), img["file_name"], kept, split))
    return Parsed(unique_ids(records), orphans, dict(dropped))


def unique_ids(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records with each image listed once. An id given to two files cannot be
    resolved (its captions would go to both): a ValueError naming them."""
    first: dict[int, ImageRecord] = {}
    kept = []
    for r in records:
        seen = first.setdefault(r.image_id, r)
        if seen is r:
            kept.append(r)
        elif (seen.file_name, seen.split) != (r.file_name, r.split):
            raise ValueError(
                f"image id {r.image_id} is given to two images ({seen.file_name!r} in "
                f"{seen.split}, {r.file_name!r} in {r.split}): its captions cannot be told "
                "apart; give each image its own id"
            )
    return kept


def parse_karpathy(data: dict[str, Any]) -> Parsed:
    """Karpathy split (dataset_coco.json): restval goes to train."""
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError("not a Karpathy split file: needs 'images'")
    records = []
    dropped: Counter[str] = Counter()
    for img in data["images"]:
        split = KARPATHY_SPLITS.get(img.get("split", ""))
        if split is None:
            continue
        image_id = int(img.get("cocoid", img.get("imgid")))
        rel = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        raws = [s.get("raw", " ".join(s.get("tokens", []))) for s in img["sentences"]]
        caps = _clean_all(raws, split, dropped)
        dropped[split] += len(raws) - len(caps)
        records.append(ImageRecord(image_id, rel, caps, split))
    records.sort(key=lambda r: (r.split, r.image_id))
    return Parsed(unique_ids(records), 0, dict(dropped))


def parse_file(path: str, karpathy: bool, split: str | None) -> Parsed:
    data = load_json(path)
    try:
        return parse_karpathy(data) if karpathy else parse_coco(data, split or "train")
    except KeyError as e:
        raise FormatError(f"{path}: an entry lacks the field {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{path}: {e}") from None
