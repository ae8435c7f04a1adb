"""The demo's synthetic data: the hard mode's captions count and relate what is drawn."""

import json
import random

from demo.make_shapes import HardScene, Thing, draw_hard, hard_captions, make_split


def test_hard_captions_count_list_and_relate_the_things():
    scene = HardScene(
        (Thing("red", "circle", 0, 1), Thing("red", "circle", 1, 0), Thing("blue", "cross", 1, 1)),
        "dotted",
    )
    captions = hard_captions(scene)
    assert captions[0] == "two red circles and a blue cross"
    assert captions[1] == "three shapes: two red circles and a blue cross"
    assert captions[2] == "a red circle to the left of a red circle"
    assert captions[3] == "a blue cross to the right of a red circle on a dotted background"
    assert captions[4].endswith("a red circle on the left")
    above = HardScene((Thing("black", "square", 2, 0), Thing("white", "diamond", 2, 1)), "striped")
    assert hard_captions(above)[2] == "a black square above a white diamond"
    assert hard_captions(above)[4].endswith("a black square at the top")
    # The things are drawn where the captions say: each grid cell holds its colour.
    img = draw_hard(above, random.Random(0))
    assert img.getpixel((133, 30))[0] < 60 and min(img.getpixel((133, 90))) > 200


def test_hard_mode_writes_a_coco_split(tmp_path):
    path = make_split(str(tmp_path), "train", 5, seed=1, mode="hard")
    data = json.load(open(path))
    assert len(data["images"]) == 5 and len(data["annotations"]) == 25
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    assert all(
        len(c) == 5 and c[1].startswith(("two shapes:", "three shapes:")) for c in by_image.values()
    )
