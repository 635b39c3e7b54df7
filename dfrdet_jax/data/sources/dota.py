"""DOTA-v2.0: polygon text labels -> horizontal boxes, large images -> overlapping square tiles.

Label files (``<root>/<split>/labelTxt/<name>.txt``, images ``<root>/<split>/images/<name>.png``)
hold one object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult``; the header lines
``imagesource:...`` and ``gsd:...`` of the released files are skipped. A polygon becomes its
enclosing horizontal box; ``difficult == 1`` objects become ignore regions (the 'dota' mAP50
protocol does not score them; 'dota_aitod', COCO-style, counts them as ground truth).

Tiling: tiles of ``tile_size`` px start every ``tile_size - overlap`` px, the last tile of a
row/column aligned with the image border, so every pixel is covered. A box cut by a tile border
is clipped to the tile and kept when its visible fraction (clipped area / full area) is at
least ``min_visible`` (default 0.5); boxes below it are dropped from that tile and counted in
the report under 'box below min_visible in a tile' (the full-image ground truth used for
evaluation keeps every box). Polygons reaching past the image border (common in the released
files) are clipped to the image and counted under 'box outside image (clipped)'.
"""

import json
import os

import numpy as np

from dfrdet_jax.data import transforms
from dfrdet_jax.data.errors import DataError, SkipReport

CLASS_NAMES = (
    "plane",
    "ship",
    "storage-tank",
    "baseball-diamond",
    "tennis-court",
    "basketball-court",
    "ground-track-field",
    "harbor",
    "bridge",
    "large-vehicle",
    "small-vehicle",
    "helicopter",
    "roundabout",
    "soccer-ball-field",
    "swimming-pool",
    "container-crane",
    "airport",
    "helipad",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".bmp")


def parse_label_file(path: str, report: SkipReport):
    """(boxes float32 [M, 4] xyxy, labels int32 [M], difficult bool [M]) of a DOTA label file.

    DataError naming the file and line for a wrong field count, a non-number coordinate or an
    unknown class (or, lenient, counted and skipped).
    """
    class_index = {n: i for i, n in enumerate(CLASS_NAMES)}
    boxes, labels, difficult = [], [], []
    with open(path) as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(("imagesource:", "gsd:")):
            continue
        fields = line.split()
        where = f"{path}:{line_no}: {line!r}"
        if len(fields) not in (9, 10):
            report.problem(
                "DOTA line with wrong field count",
                f"{where}: expected 'x1 y1 ... x4 y4 class [difficult]', got {len(fields)} fields",
            )
            continue
        try:
            xy = np.array(fields[:8], np.float32).reshape(4, 2)
        except ValueError:
            report.problem("DOTA line with bad coordinates", f"{where}: coordinates not numbers")
            continue
        if not np.isfinite(xy).all():
            report.problem("DOTA line with bad coordinates", f"{where}: NaN or infinite coordinate")
            continue
        if fields[8] not in class_index:
            report.problem("unknown category", f"{where}: class {fields[8]!r} not in DOTA-v2.0")
            continue
        boxes.append([*xy.min(0), *xy.max(0)])
        labels.append(class_index[fields[8]])
        difficult.append(len(fields) == 10 and fields[9] == "1")
    return (
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int32),
        np.array(difficult, bool),
    )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` px overlapping by ``overlap``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    if step <= 0:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def clip_to_tile(boxes, x0, y0, tile_w, tile_h, min_visible):
    """(boxes in tile coordinates clipped to the tile, bool keep [M]) for a tile at (x0, y0)."""
    shifted = boxes - np.array([x0, y0, x0, y0], np.float32)
    clipped = np.stack(
        [
            np.clip(shifted[:, 0], 0, tile_w),
            np.clip(shifted[:, 1], 0, tile_h),
            np.clip(shifted[:, 2], 0, tile_w),
            np.clip(shifted[:, 3], 0, tile_h),
        ],
        axis=1,
    )
    area = np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 1e-6), axis=1)
    visible = np.prod(np.maximum(clipped[:, 2:] - clipped[:, :2], 0), axis=1)
    return clipped, visible / area >= min_visible


def _image_path(image_dir: str, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(image_dir, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def dota_records(
    root, split, *, tile_size=1024, overlap=200, min_visible=0.5, lenient=False, gt_json=None
):
    """(tile records, full images as COCO image dicts, full GT annotations, report).

    Tile records are those of sources/coco.py plus ``tile_offset`` (x, y) and ``tile_size``;
    ``image_id`` is the full image's id (1-based position in the sorted label list). When
    ``gt_json`` is given the full-image ground truth is written there in COCO format
    (category ids 1..18), for evaluation after merging tile predictions.
    """
    label_dir = os.path.join(root, split, "labelTxt")
    image_dir = os.path.join(root, split, "images")
    if not os.path.isdir(label_dir):
        raise DataError(f"{label_dir}: DOTA label folder not found")
    report = SkipReport(lenient)
    records, images, annotations = [], [], []
    for image_id, name in enumerate(sorted(os.listdir(label_dir)), 1):
        if not name.endswith(".txt"):
            continue
        label_path = os.path.join(label_dir, name)
        path = _image_path(image_dir, name[:-4])
        if path is None:
            report.problem(
                "missing image file", f"{label_path}: no image {name[:-4]}.* in {image_dir}"
            )
            continue
        try:
            h, w = transforms.image_hw(path)
        except DataError as e:
            report.problem("unreadable image file", f"{label_path}: {e}")
            continue
        boxes, labels, difficult = parse_label_file(label_path, report)
        # Released DOTA polygons often reach slightly past the border: clip, and count.
        clipped = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        for _ in range(int((clipped != boxes).any(axis=1).sum())):
            report.add("box outside image (clipped)", label_path)
        boxes = clipped
        images.append(
            {"id": image_id, "file_name": os.path.relpath(path, image_dir), "height": h, "width": w}
        )
        for box, label, diff in zip(boxes, labels, difficult, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [
                        float(box[0]),
                        float(box[1]),
                        float(box[2] - box[0]),
                        float(box[3] - box[1]),
                    ],
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": 0,
                    "ignore": int(diff),
                }
            )
        for y0 in tile_starts(h, tile_size, overlap):
            for x0 in tile_starts(w, tile_size, overlap):
                tile_w, tile_h = min(tile_size, w - x0), min(tile_size, h - y0)
                clipped, keep = clip_to_tile(boxes, x0, y0, tile_w, tile_h, min_visible)
                inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
                for _ in range(int((inside & ~keep).sum())):
                    report.add("box below min_visible in a tile", label_path)
                records.append(
                    {
                        "path": path,
                        "image_id": image_id,
                        "hw": (tile_h, tile_w),
                        "boxes": clipped[keep],
                        "labels": labels[keep],
                        "ignore": difficult[keep],
                        "tile_offset": (x0, y0),
                        "tile_size": tile_size,
                    }
                )
    if gt_json is not None:
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
        os.makedirs(os.path.dirname(gt_json) or ".", exist_ok=True)
        tmp = gt_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        os.replace(tmp, gt_json)
    report.log(label_dir)
    return records, images, annotations, report
