"""Generates a small captioning dataset in COCO format: coloured shapes on textured backgrounds.

    python -m demo.make_shapes OUT --train 600 --val 100 [--mode simple|hard]

writes OUT/train/*.jpg, OUT/val/*.jpg and OUT/annotations/captions_{train,val}.json
(COCO 'images' + 'annotations'), several differently worded captions per image.
Each image shows one shape whose colour, kind, size and position the captions
name, so a model can learn to describe it from frozen features; the demo and
the end-to-end tests need no download.

`--mode hard` is where cross-entropy alone plateaus: two or three objects of six
colours and five shapes in a 3x2 grid, and captions that count them ("two red
circles"), list them and relate them (left of, right of, above, below). Getting a
caption right means getting every object and relation right at once, which is what
a sequence-level reward such as CIDEr-D scores and per-word cross-entropy does not.
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


HARD_COLORS = {
    **COLORS,
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
HARD_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
GRID = (3, 2)  # columns, rows
NUMBERS = {2: "two", 3: "three"}


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


def background(kind: str, rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A plain colour with diagonal stripes or a grid of dots in a darker shade of it."""
    w, h = IMAGE_SIZE
    base = tuple(rng.randint(90, 170) for _ in range(3))
    img = Image.new("RGB", IMAGE_SIZE, base)
    d = ImageDraw.Draw(img)
    shade = tuple(max(0, c - 45) for c in base)
    if kind == "striped":
        step = rng.randint(8, 14)
        for x in range(-h, w, step):
            d.line([(x, 0), (x + h, h)], fill=shade, width=3)
    else:
        step = rng.randint(10, 16)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=shade)
    return img, d


def draw(s: Scene, rng: random.Random) -> Image.Image:
    w, h = IMAGE_SIZE
    img, d = background(s.background, rng)
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


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    column: int  # 0 left .. 2 right
    row: int  # 0 top, 1 bottom

    @property
    def words(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class HardScene:
    things: tuple[Thing, ...]  # left to right, then top to bottom
    background: str


def random_hard_scene(rng: random.Random) -> HardScene:
    cells = rng.sample([(c, r) for c in range(GRID[0]) for r in range(GRID[1])], rng.choice((2, 3)))
    things = []
    for column, row in sorted(cells):
        if things and rng.random() < 0.3:  # a repeat, so that counting matters
            color, shape = things[-1].color, things[-1].shape
        else:
            color, shape = rng.choice(list(HARD_COLORS)), rng.choice(HARD_SHAPES)
        things.append(Thing(color, shape, column, row))
    return HardScene(tuple(things), rng.choice(BACKGROUNDS))


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _counted(things: tuple[Thing, ...]) -> str:
    """ "two red circles and a blue square": equal things counted, in order of appearance."""
    groups: dict[str, int] = {}
    for t in things:
        groups[t.words] = groups.get(t.words, 0) + 1
    parts = []
    for words, n in groups.items():
        color, shape = words.split(" ")
        parts.append(f"a {words}" if n == 1 else f"{NUMBERS[n]} {color} {_plural(shape)}")
    return " and ".join(parts) if len(parts) < 3 else f"{parts[0]}, {parts[1]} and {parts[2]}"


def _relation(a: Thing, b: Thing) -> str:
    if a.column != b.column:
        return "to the left of" if a.column < b.column else "to the right of"
    return "above" if a.row < b.row else "below"


def hard_captions(s: HardScene) -> list[str]:
    first, second = s.things[0], s.things[1]
    last = s.things[-1]
    n = NUMBERS[len(s.things)]
    return [
        _counted(s.things),
        f"{n} shapes: {_counted(s.things)}",
        f"a {first.words} {_relation(first, second)} a {second.words}",
        f"a {last.words} {_relation(last, first)} a {first.words} on a {s.background} background",
        f"{n} shapes on a {s.background} background, a {first.words} {_place(s.things)}",
    ]


def _place(things: tuple[Thing, ...]) -> str:
    """Where the first thing is: on the left when no other shares its column."""
    first = things[0]
    if all(t.column > first.column for t in things[1:]):
        return "on the left"
    return "at the top" if first.row == 0 else "at the bottom"


def draw_hard(s: HardScene, rng: random.Random) -> Image.Image:
    w, h = IMAGE_SIZE
    img, d = background(s.background, rng)
    cw, ch = w // GRID[0], h // GRID[1]
    for t in s.things:
        r = rng.randint(14, 18)
        cx = t.column * cw + cw // 2 + rng.randint(-5, 5)
        cy = t.row * ch + ch // 2 + rng.randint(-4, 4)
        color = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in HARD_COLORS[t.color])
        if t.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif t.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif t.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif t.shape == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
        else:  # cross
            q = r // 3
            d.rectangle([cx - r, cy - q, cx + r, cy + q], fill=color)
            d.rectangle([cx - q, cy - r, cx + q, cy + r], fill=color)
    return img


def make_split(
    out_dir: str, split: str, count: int, seed: int, first_id: int = 1, mode: str = "simple"
) -> str:
    """Writes `count` images and their COCO captions file; returns the JSON path."""
    rng = random.Random(f"{seed}-{split}")
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + i
        file_name = f"shapes_{split}_{image_id:06d}.jpg"
        if mode == "hard":
            scene = random_hard_scene(rng)
            image, captions = draw_hard(scene, rng), hard_captions(scene)
        else:
            scene = random_scene(rng)
            image, captions = draw(scene, rng), captions_for(scene)
        image.save(os.path.join(image_dir, file_name), "JPEG", quality=92)
        w, h = IMAGE_SIZE
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for caption in captions:
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
    p.add_argument(
        "--mode",
        default="simple",
        choices=["simple", "hard"],
        help="simple: one shape per image; hard: two or three, counted and related",
    )
    a = p.parse_args(argv)
    for split, count, first in (("train", a.train, 1), ("val", a.val, 1_000_000)):
        path = make_split(a.out_dir, split, count, a.seed, first_id=first, mode=a.mode)
        print(f"{split}: {count} images -> {os.path.join(a.out_dir, split)}, captions -> {path}")


if __name__ == "__main__":
    main()
