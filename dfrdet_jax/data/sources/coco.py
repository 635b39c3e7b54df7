"""COCO-format annotations (synthetic, AI-TOD, TinyPerson) as a list of image records.

A record is a plain dict (cheap to pickle into worker processes):
  path      str                image file
  image_id  int                id in the COCO json
  hw        (int, int)         original (height, width)
  boxes     float32 [M, 4]     (x1, y1, x2, y2) original-image pixels
  labels    int32 [M]          0-based class index (sorted category ids)
  ignore    bool [M]           TinyPerson ignore/uncertain regions (not ground truth)

Degenerate boxes (zero width or height, present in the AI-TOD files) follow
``degenerate``: 'expand' (default) grows each zero extent to 1 px centred on the box position
(clipped to the image) and counts it under 'degenerate box expanded'; 'error' raises.
"""

import json
import os
from typing import Any

import numpy as np

from dfrdet_jax.data import transforms
from dfrdet_jax.data.errors import DataError, SkipReport


def load_coco_json(ann_file: str) -> dict[str, Any]:
    """Parsed json, checked to be COCO-shaped (images, annotations, categories lists)."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{ann_file}: cannot read COCO json: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: not a COCO json (top level is {type(data).__name__})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: not a COCO json (no '{key}' list)")
    return data


def category_table(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    """(sorted category ids, their names); class index i <-> category_ids[i]."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]


def _box_xyxy(ann, hw, ann_file, report: SkipReport, degenerate: str):
    """(x1, y1, x2, y2) of a COCO [x, y, w, h] box, or None when lenient mode drops it."""
    h, w = hw
    where = f"{ann_file}: annotation id {ann.get('id')} (image {ann.get('image_id')})"
    bbox = ann.get("bbox")
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):  # not a list of four numbers
        report.problem("malformed bbox", f"{where}: bbox {bbox!r} is not [x, y, w, h]")
        return None
    if not np.isfinite([x, y, bw, bh]).all():
        report.problem("non-finite bbox", f"{where}: bbox {bbox} has a NaN or infinite value")
        return None
    if bw < 0 or bh < 0:
        report.problem("negative box size", f"{where}: negative size in bbox {bbox}")
        return None
    x1, y1, x2, y2 = x, y, x + bw, y + bh
    eps = 1e-3  # float round-off in the released files
    if x1 < -eps or y1 < -eps or x2 > w + eps or y2 > h + eps:
        report.problem(
            "box outside image (clipped)", f"{where}: bbox {bbox} outside the {w}x{h} image"
        )
    x1, x2 = np.clip([x1, x2], 0, w)
    y1, y2 = np.clip([y1, y2], 0, h)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        if degenerate == "error":
            raise DataError(f"{where}: degenerate bbox {bbox} (set degenerate='expand')")
        report.add("degenerate box expanded to 1 px", where)
        x1, x2 = _grow_to_one(x1, x2, w)
        y1, y2 = _grow_to_one(y1, y2, h)
    return x1, y1, x2, y2


def _grow_to_one(lo: float, hi: float, limit: float) -> tuple[float, float]:
    """Widen [lo, hi) to at least 1 px around its centre, inside [0, limit]."""
    if hi - lo >= 1:
        return lo, hi
    centre = (lo + hi) / 2
    lo = min(max(centre - 0.5, 0.0), max(limit - 1.0, 0.0))
    return lo, min(lo + 1.0, limit)


def _check_image_file(path: str, img: dict, where: str, report: SkipReport, decode: bool):
    """True when the image file exists, is readable (its header; every pixel if ``decode``) and
    has the size the annotation file gives; otherwise DataError (lenient: counted, False)."""
    if not os.path.isfile(path):
        report.problem("missing image file", f"{where}: file {path} does not exist")
        return False
    try:
        h, w = transforms.image_hw(path)
        if decode:
            transforms.decode_image(path)
    except DataError as e:
        report.problem("unreadable image file", f"{where}: {e}")
        return False
    if (h, w) != (int(img["height"]), int(img["width"])):
        report.problem(
            "image size differs from the annotation file",
            f"{where}: {path} is {w}x{h} px but the annotation file says "
            f"{img['width']}x{img['height']} (resized after annotation?)",
        )
        return False
    return True


def _image_table(data: dict, ann_file: str) -> dict[int, dict]:
    """{image id: image record}; DataError for a malformed record or an id used twice."""
    images = {}
    for img in data["images"]:
        try:
            image_id = int(img["id"])
            h, w, name = int(img["height"]), int(img["width"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{ann_file}: image record {img!r} lacks id/file_name/height/width"
            ) from e
        if image_id in images:
            raise DataError(
                f"{ann_file}: image id {image_id} is used twice ({images[image_id]['file_name']!r} "
                f"and {name!r}): their annotations could belong to either; give each its own id"
            )
        if h <= 0 or w <= 0:
            raise DataError(f"{ann_file}: image id {image_id} ({name!r}) has size {w}x{h}")
        images[image_id] = img
    return images


def coco_records(
    ann_file: str,
    image_dir: str,
    *,
    lenient: bool = False,
    degenerate: str = "expand",
    check_files: bool = True,
    decode_images: bool = False,
) -> tuple[list[dict], list[int], list[str], SkipReport]:
    """(records sorted by image id, category ids, class names, report) of a COCO json.

    Raises DataError naming the file and record for: a non-COCO json, an image id used twice,
    an annotation with an unknown category or image id, a box outside the image or with a NaN
    or infinite value, a missing or unreadable image file, or one whose size differs from the
    json's (read from the header; ``decode_images`` decodes every image too, to find truncated
    files before training). With ``lenient`` those are counted in the report instead (bad images
    skipped with their annotations, counted too; bad annotations skipped; outside boxes
    clipped). Annotations with ``ignore`` or ``uncertain`` set (the TinyPerson flags) become
    ignore regions; ``iscrowd`` ones too.
    """
    if degenerate not in ("expand", "error"):
        raise ValueError(f"degenerate must be 'expand' or 'error', got {degenerate!r}")
    data = load_coco_json(ann_file)
    report = SkipReport(lenient)
    cat_ids, names = category_table(data)
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    images = _image_table(data, ann_file)
    paths = {}  # image id -> file, for the images kept
    for image_id in sorted(images):
        img = images[image_id]
        path = os.path.join(image_dir, img["file_name"])
        where = f"{ann_file}: image id {image_id}"
        if not check_files or _check_image_file(path, img, where, report, decode_images):
            paths[image_id] = path
    per_image: dict[int, list] = {i: [] for i in paths}
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        if image_id not in images:
            report.problem(
                "annotation of unknown image",
                f"{ann_file}: annotation id {ann.get('id')} refers to unknown image {image_id}",
            )
            continue
        if image_id not in paths:  # lenient: its image was skipped above
            report.add(
                "annotation of a skipped image", f"{ann_file}: annotation id {ann.get('id')}"
            )
            continue
        if ann.get("category_id") not in cat_index:
            report.problem(
                "unknown category",
                f"{ann_file}: annotation id {ann.get('id')} (image {image_id}) has category_id "
                f"{ann.get('category_id')} not in the category list {cat_ids}",
            )
            continue
        img = images[image_id]
        box = _box_xyxy(ann, (int(img["height"]), int(img["width"])), ann_file, report, degenerate)
        if box is None:
            continue
        ignore = bool(ann.get("ignore") or ann.get("uncertain") or ann.get("iscrowd"))
        per_image[image_id].append((box, cat_index[ann["category_id"]], ignore))
    records = []
    for image_id, path in paths.items():
        img, anns = images[image_id], per_image[image_id]
        records.append(
            {
                "path": path,
                "image_id": image_id,
                "hw": (int(img["height"]), int(img["width"])),
                "boxes": np.array([a[0] for a in anns], np.float32).reshape(-1, 4),
                "labels": np.array([a[1] for a in anns], np.int32),
                "ignore": np.array([a[2] for a in anns], bool),
            }
        )
    report.log(ann_file)
    return records, cat_ids, names, report
