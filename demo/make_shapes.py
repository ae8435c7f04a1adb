"""Generates a small captioning dataset in COCO format: coloured shapes on textured backgrounds.

    python -m demo.make_shapes OUT --train 600 --val 100

writes OUT/train/*.jpg, OUT/val/*.jpg and OUT/annotations/captions_{train,val}.json
(COCO 'images' + 'annotations'), several differently worded captions per image.
Each image shows one shape whose colour, kind, size and position the captions
name, so a model can learn to describe it from frozen features; the demo and
the end-to-end tests need no download.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right")
BACKGROUNDS = ("striped", "dotted")
IMAGE_SIZE = (160, 120)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str


def captions_for(s: Scene) -> list[str]:
    """Several wordings of the same scene, as COCO has several annotators."""
    side = f"on the {s.position}"
    return [
        f"a {s.size} {s.color} {s.shape} {side}",
        f"a {s.color} {s.shape} {side} of the picture",
        f"there is a {s.size} {s.color} {s.shape} on a {s.background} background",
        f"A {s.size} {s.shape}, coloured {s.color}, {side}.",
        f"a {s.background} background with a {s.color} {s.shape} {side}",
    ]


def draw(s: Scene, rng: random.Random) -> Image.Image:
    w, h = IMAGE_SIZE
    base = tuple(rng.randint(90, 170) for _ in range(3))
    img = Image.new("RGB", IMAGE_SIZE, base)
    d = ImageDraw.Draw(img)
    shade = tuple(max(0, c - 45) for c in base)
    if s.background == "striped":
        step = rng.randint(8, 14)
        for x in range(-h, w, step):
            d.line([(x, 0), (x + h, h)], fill=shade, width=3)
    else:
        step = rng.randint(10, 16)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=shade)
    r = rng.randint(30, 38) if s.size == "large" else rng.randint(11, 15)
    cx = (
        rng.randint(r + 4, w // 2 - r // 2)
        if s.position == "left"
        else rng.randint(w // 2 + r // 2, w - r - 4)
    )
    cy = rng.randint(r + 4, h - r - 4)
    color = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[s.color])
    box = [cx - r, cy - r, cx + r, cy + r]
    if s.shape == "circle":
        d.ellipse(box, fill=color)
    elif s.shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(list(COLORS)),
        rng.choice(SHAPES),
        rng.choice(SIZES),
        rng.choice(POSITIONS),
        rng.choice(BACKGROUNDS),
    )


def make_split(out_dir: str, split: str, count: int, seed: int, first_id: int = 1) -> str:
    """Writes `count` images and their COCO captions file; returns the JSON path."""
    rng = random.Random(f"{seed}-{split}")
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + i
        scene = random_scene(rng)
        file_name = f"shapes_{split}_{image_id:06d}.jpg"
        draw(scene, rng).save(os.path.join(image_dir, file_name), "JPEG", quality=92)
        w, h = IMAGE_SIZE
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for caption in captions_for(scene):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "caption": caption}
            )
    path = os.path.join(out_dir, "annotations", f"captions_{split}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "info": {"description": "generated shapes"},
                "images": images,
                "annotations": annotations,
            },
            f,
        )
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=600, help="number of training images")
    p.add_argument("--val", type=int, default=100, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for split, count, first in (("train", a.train, 1), ("val", a.val, 1_000_000)):
        path = make_split(a.out_dir, split, count, a.seed, first_id=first)
        print(f"{split}: {count} images -> {os.path.join(a.out_dir, split)}, captions -> {path}")


if __name__ == "__main__":
    main()
