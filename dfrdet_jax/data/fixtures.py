"""Tiny data sets in the real on-disk formats, for tests and examples (numpy + pillow only)."""

import json
import os

import numpy as np
from PIL import Image


def write_coco_fixture(
    root: str,
    images: list[dict],
    categories: list[dict],
    annotations: list[dict],
    ann_name: str = "ann.json",
    image_dir: str = "images",
) -> tuple[str, str]:
    """Write random-pixel PNGs for ``images`` (COCO image dicts) and the COCO json.

    Returns (json path, image folder).
    """
    folder = os.path.join(root, image_dir)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in images:
        pixels = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, img["file_name"]))
    ann_file = os.path.join(root, ann_name)
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file, folder


def write_dota_fixture(root: str, split: str, labels: dict[str, tuple[int, int, list[str]]]):
    """DOTA layout root/split/{images,labelTxt}; labels: name -> (height, width, label lines)."""
    image_dir = os.path.join(root, split, "images")
    label_dir = os.path.join(root, split, "labelTxt")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w, lines) in labels.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(image_dir, name + ".png")
        )
        with open(os.path.join(label_dir, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
