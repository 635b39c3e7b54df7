"""The embedded default data: synthetic aerial-like scenes of tiny objects, in COCO format.

Generated once (numpy, deterministic from the seed) into ``cache_dir/synthetic_<key>/`` where
the key hashes every generation parameter, so changing one regenerates. Generation writes to a
temporary folder renamed into place at the end, so a killed run never leaves a half cache.

Scenes: smooth multi-scale textured ground, roads/strips and object-like distractors (shapes not
among the classes, low-contrast blobs), plus objects of 8 classes with distinct shapes and
colours (with brightness jitter). Object sizes are log-normal, mostly 2-32 px with a tail to
64 px (like AI-TOD); counts per image range from a few to ``max_objects``.
"""

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

# Part of the cache key: bump it whenever generation changes, so old caches are not reused.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")  # each drawn from its own random stream
PLACEMENT_ATTEMPTS = 10  # random spots tried for an object before the scene is declared full

CLASS_NAMES = (
    "square",
    "ring",
    "cross",
    "triangle",
    "diamond",
    "bar",
    "dotted_disk",
    "l_shape",
)
# Base RGB colour per class; jittered per object.
_CLASS_COLOURS = np.array(
    [
        [230, 60, 50],
        [60, 200, 230],
        [240, 230, 60],
        [70, 220, 80],
        [230, 90, 220],
        [250, 150, 40],
        [240, 240, 240],
        [90, 100, 250],
    ],
    np.float32,
)


def _shape_mask(cls: int, size: int) -> np.ndarray:
    """bool [size, size] mask of class ``cls`` drawn in a size x size box (classes differ)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1  # cell centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(x, y)
    t = 1.0 / max(size, 1) * 2  # one pixel in these units: keeps thin parts visible
    masks = {
        0: np.ones_like(r, bool),
        1: (r <= 1.0) & (r >= 0.55 - t),
        2: (np.abs(x) <= 0.3 + t) | (np.abs(y) <= 0.3 + t),
        3: (y >= -1) & (np.abs(x) <= (y + 1) / 2 + t),
        4: np.abs(x) + np.abs(y) <= 1.0 + t,
        5: np.abs(y) <= 0.35 + t,
        6: (r <= 1.0) & ~((r > 0.3 + t) & (r < 0.6)),
        7: (x <= -0.3 + t) | (y >= 0.3 - t),
    }
    mask = masks[cls]
    if not mask.any():
        mask[size // 2, size // 2] = True
    return mask


def _distractor_mask(kind: int, size: int) -> np.ndarray:
    """Shapes that are NOT classes: hollow square, thin ring arc, T-shape, ellipse."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return [
        (np.maximum(np.abs(x), np.abs(y)) >= 0.6),
        (np.hypot(x, y) <= 1) & (np.hypot(x, y) >= 0.8) & (x > 0),
        (y <= -0.4) | (np.abs(x) <= 0.2),
        (x / 1.0) ** 2 + (y / 0.45) ** 2 <= 1,
    ][kind]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] textured ground: multi-scale smooth noise, tint, strips."""
    img = np.zeros((size, size, 3), np.float32)
    for cells, amp in ((4, 50.0), (16, 25.0), (size // 2, 12.0)):
        grid = rng.normal(0, amp, (cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
        img += up[..., None] * rng.uniform(0.7, 1.3, 3).astype(np.float32)  # tinted texture
    img += rng.uniform(60, 140, 3).astype(np.float32)  # ground tint
    for _ in range(rng.integers(0, 4)):  # roads / field borders
        w = int(rng.integers(2, max(3, size // 16)))
        p = int(rng.integers(0, size - w))
        shade = rng.uniform(-60, 60)
        if rng.random() < 0.5:
            img[p : p + w] += shade
        else:
            img[:, p : p + w] += shade
    img += rng.normal(0, 6, img.shape).astype(np.float32)  # sensor noise
    return img


def _sample_size(rng: np.random.Generator, min_size: int, max_size: int) -> int:
    """Log-normal object size in px: median ~10, mostly 2-32, tail up to max_size."""
    return int(np.clip(round(rng.lognormal(np.log(10.0), 0.7)), min_size, max_size))


def _paste(img, mask, x, y, colour):
    """Paint ``colour`` into float image ``img`` where ``mask`` [h, w] is set, at (x, y)."""
    h, w = mask.shape
    region = img[y : y + h, x : x + w]
    region[mask] = colour


def _tight_box(mask: np.ndarray, x: int, y: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) px of the set pixels of ``mask`` placed at (x, y)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        x + int(cols[0]),
        y + int(rows[0]),
        int(cols[-1] - cols[0] + 1),
        int(rows[-1] - rows[0] + 1),
    )


def generate_scene(rng, size, num_objects, min_size, max_size, num_distractors):
    """(uint8 [size, size, 3] image, list of (class, x, y, w, h)) of one scene.

    Objects never overlap one another (a box always holds a fully visible object; a scene too
    crowded for the next object gets fewer), distractors lie underneath them, and every box is
    tight around the painted pixels.
    """
    img = _background(rng, size)
    for _ in range(num_distractors):
        s = _sample_size(rng, min_size, max_size)
        x, y = rng.integers(0, size - s + 1, 2)
        if rng.random() < 0.5:
            mask = _distractor_mask(int(rng.integers(4)), s)
            colour = rng.uniform(30, 230, 3)
        else:  # low-contrast blob
            mask = _distractor_mask(3, s)
            colour = img[y + s // 2, x + s // 2] + rng.uniform(-20, 20, 3)
        _paste(img, mask, x, y, colour)
    objects = []
    occupied = np.zeros((size, size), bool)
    for _ in range(num_objects):
        cls = int(rng.integers(len(CLASS_NAMES)))
        s = _sample_size(rng, min_size, max_size)
        for _attempt in range(PLACEMENT_ATTEMPTS):
            x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
            if not occupied[y : y + s, x : x + s].any():
                break
        else:
            continue
        occupied[y : y + s, x : x + s] = True
        colour = _CLASS_COLOURS[cls] * rng.uniform(0.75, 1.1) + rng.normal(0, 10, 3)
        mask = _shape_mask(cls, s)
        _paste(img, mask, x, y, colour)
        objects.append((cls, *_tight_box(mask, x, y)))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _params_key(params: dict) -> str:
    keyed = {**params, "generator_version": GENERATOR_VERSION}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def _write_split(root, split, num_images, seed, params):
    """Images root/<split>/*.png and root/<split>.json (COCO)."""
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images, annotations = [], []
    size = params["image_size"]
    for i in range(num_images):
        n = int(
            np.clip(
                rng.pareto(1.2) * params["min_objects"] + params["min_objects"],
                1,
                params["max_objects"],
            )
        )
        d = int(rng.integers(0, params["max_distractors"] + 1))
        img, objects = generate_scene(rng, size, n, params["min_size"], params["max_size"], d)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, name), compress_level=1)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for cls, x, y, w, h in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    ann_file = os.path.join(root, f"{split}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def ensure_synthetic(
    cache_dir: str,
    *,
    num_train: int = 256,
    num_val: int = 64,
    num_test: int = 256,
    image_size: int = 128,
    seed: int = 0,
    min_size: int = 2,
    max_size: int = 64,
    min_objects: int = 3,
    max_objects: int = 200,
    max_distractors: int = 30,
) -> dict[str, tuple[str, str]]:
    """Generate (once) the synthetic data set; {'train'|'val'|'test': (coco json, image folder)}.

    The three splits are drawn independently (one random stream each, so the train and val images
    do not depend on ``num_test``); 'test' is the held-out split that comparison tables are scored
    on and that no checkpoint selection or tuning reads.

    Deterministic from ``seed`` and the other parameters; the cache folder is keyed by all of
    them. Objects per image: a heavy-tailed count in [min_objects, max_objects] (few to
    hundreds); object sizes in px in [min_size, min(max_size, image_size)].
    """
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "min_size": min_size,
        "max_size": min(max_size, image_size),
        "min_objects": min_objects,
        "max_objects": max_objects,
        "max_distractors": max_distractors,
        "version": 1,
    }
    root = os.path.join(cache_dir, f"synthetic_{_params_key(params)}")
    if not os.path.isdir(root):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp_synthetic_", dir=cache_dir)
        try:
            _write_split(tmp, "train", num_train, seed, params)
            _write_split(tmp, "val", num_val, seed, params)
            _write_split(tmp, "test", num_test, seed, params)
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params, f, indent=1)
            try:
                os.rename(tmp, root)
            except OSError:  # another process finished first: keep its copy
                if not os.path.isdir(root):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    return {s: (os.path.join(root, f"{s}.json"), os.path.join(root, s)) for s in SPLITS}
