"""COCO ground truth and results I/O, validation, and conversion of model outputs.

Decisions on bad input (each is deliberate and tested):
  * detection with an ``image_id`` or ``category_id`` absent from the ground truth, a missing key,
    a NaN/inf box or score, or a negative width/height: ``EvaluationInputError`` naming the
    source, the record index and the record. Zero-width/height detections are legal (they can
    only be false positives).
  * a results file with zero bytes: ``EvaluationInputError`` (a crashed writer looks like this);
    a file holding ``[]`` or an empty list: valid, every metric with ground truth scores 0.
  * ground-truth box with zero or negative width/height: it can never be matched, so it is
    dropped from scoring and counted in ``skipped['gt_zero_area']`` of the metrics (with a log
    warning), never silently.
  * ground-truth box with NaN/inf coordinates: ``EvaluationInputError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

GroundTruth = str | os.PathLike | dict
Detections = str | os.PathLike | Sequence[dict]

_LOG = logging.getLogger(__name__)
_REQUIRED_DET_KEYS = ("image_id", "category_id", "bbox", "score")


class EvaluationInputError(ValueError):
    """Ground truth or detections that cannot be scored as given."""


def _read_json(path, what: str):
    if os.path.isdir(path):
        raise EvaluationInputError(
            f"{what} {os.fspath(path)} is a folder; pass the JSON file itself"
        )
    with open(path) as f:
        text = f.read()
    if not text.strip():
        raise EvaluationInputError(
            f"{what} file {os.fspath(path)} is empty; expected JSON (write [] for no detections)"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"{what} file {os.fspath(path)} is not valid JSON: {e}") from e


def load_ground_truth(gt: GroundTruth) -> tuple[dict, dict[str, int]]:
    """A private, validated copy of COCO-format ground truth.

    Returns (dataset dict with 'images', 'annotations', 'categories'; every annotation has
    'id', 'area' (w*h when missing) and 'iscrowd'), skipped counts {'gt_zero_area': n}).
    """
    source = "ground truth" if isinstance(gt, dict) else os.fspath(gt)
    data = _read_json(gt, "Ground-truth") if not isinstance(gt, dict) else gt
    if not isinstance(data, dict):
        raise EvaluationInputError(
            f"{source}: COCO ground truth is a JSON object with 'images', 'annotations' and "
            f"'categories' lists, not a {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise EvaluationInputError(f"{source}: COCO ground truth needs a '{key}' list")
    if data is gt:  # copy what scoring modifies (the annotation dicts) rather than deep-copying
        data = {**gt, "annotations": [dict(ann) for ann in gt["annotations"]]}
    # pycocotools keys images and annotations by id: a repeated id silently drops one record
    # and counts another twice.
    for what, records in (("image", data["images"]), ("annotation", data["annotations"])):
        ids = [r["id"] for r in records if isinstance(r, dict) and "id" in r]
        if len(set(ids)) != len(ids):
            seen, repeated = set(), None
            for i in ids:
                if i in seen:
                    repeated = i
                    break
                seen.add(i)
            raise EvaluationInputError(
                f"{source}: {what} id {repeated!r} is used {ids.count(repeated)} times; "
                f"every {what} needs its own id"
            )
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    kept, zero_area = [], 0
    for index, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in image_ids or ann.get("category_id") not in category_ids:
            raise EvaluationInputError(
                f"{source}: annotation #{index} has an image_id or category_id that is not "
                f"listed in 'images'/'categories': {ann}"
            )
        bbox = np.asarray(ann.get("bbox", ()), dtype=np.float64)
        if bbox.shape != (4,) or not np.isfinite(bbox).all():
            raise EvaluationInputError(
                f"{source}: annotation #{index} has an invalid bbox (need 4 finite numbers): {ann}"
            )
        if bbox[2] <= 0 or bbox[3] <= 0:
            zero_area += 1
            continue
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", index + 1)
        kept.append(ann)
    if zero_area:
        _LOG.warning("%s: %d ground-truth boxes with zero area are not scored", source, zero_area)
    data["annotations"] = kept
    return data, {"gt_zero_area": zero_area}


def load_detections(detections: Detections, gt: dict) -> list[dict]:
    """Validated detections for ``gt``, as fresh result annotations.

    ``detections`` is a COCO results file path or a list of dicts; see the module docstring for
    what is rejected. Each returned dict has image_id, category_id, bbox, score and the fields
    pycocotools' ``loadRes`` adds to box results: area (w*h), id (index + 1) and iscrowd 0.
    """
    if isinstance(detections, (str, os.PathLike)):
        source = os.fspath(detections)
        detections = _read_json(detections, "Results")
    else:
        source = "detections"
    if not isinstance(detections, (list, tuple)):
        raise EvaluationInputError(f"{source}: COCO results must be a list of dicts")
    if not detections:
        return []
    try:  # column-wise: one pass per key is much cheaper than per-record checks
        columns = {k: [d[k] for d in detections] for k in _REQUIRED_DET_KEYS}
    except (KeyError, TypeError):
        index = next(
            i
            for i, d in enumerate(detections)
            if not isinstance(d, dict) or any(k not in d for k in _REQUIRED_DET_KEYS)
        )
        raise EvaluationInputError(
            f"{source}: record #{index} needs keys {_REQUIRED_DET_KEYS}: {detections[index]}"
        ) from None
    for key, known in (
        ("image_id", {img["id"] for img in gt["images"]}),
        ("category_id", {cat["id"] for cat in gt["categories"]}),
    ):
        unknown = set(columns[key]) - known
        if unknown:
            index = next(i for i, v in enumerate(columns[key]) if v in unknown)
            raise EvaluationInputError(
                f"{source}: record #{index} has {key} {columns[key][index]!r} that is not in "
                f"the ground truth: {detections[index]}"
            )
    boxes = _check_numbers(columns["bbox"], columns["score"], detections, source)
    areas = (boxes[:, 2] * boxes[:, 3]).tolist()
    return [
        {
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "score": score,
            "area": area,
            "id": index + 1,
            "iscrowd": 0,
        }
        for index, (image_id, category_id, bbox, score, area) in enumerate(
            zip(*columns.values(), areas)
        )
    ]


def _check_numbers(bboxes: list, scores: list, dets: Sequence, source: str) -> np.ndarray:
    """Boxes [N, 4] float64 after checking shapes, finiteness and non-negative sizes."""
    try:  # numbers only: numpy would read "0.9" as 0.9, which scoring then sorts as text
        boxes, score_array = np.asarray(bboxes), np.asarray(scores)
        well_formed = (
            boxes.shape == (len(dets), 4)
            and score_array.shape == (len(dets),)
            and boxes.dtype.kind in "iuf"
            and score_array.dtype.kind in "iuf"
        )
    except (TypeError, ValueError):
        well_formed = False
    if not well_formed:
        index = next(i for i, d in enumerate(dets) if not _is_box_and_score(d))
        raise EvaluationInputError(
            f"{source}: record #{index} needs bbox [x, y, w, h] and a score, all numbers: "
            f"{dets[index]}"
        )
    boxes, score_array = boxes.astype(np.float64), score_array.astype(np.float64)
    bad = ~np.isfinite(boxes).all(axis=1) | ~np.isfinite(score_array)
    if bad.any():
        index = int(np.argmax(bad))
        raise EvaluationInputError(
            f"{source}: record #{index} has a NaN or infinite bbox/score: {dets[index]}"
        )
    negative = (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if negative.any():
        index = int(np.argmax(negative))
        raise EvaluationInputError(
            f"{source}: record #{index} has a negative width or height: {dets[index]}"
        )
    return boxes


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_box_and_score(det: dict) -> bool:
    bbox = det["bbox"]
    return (
        isinstance(bbox, (list, tuple, np.ndarray))
        and len(bbox) == 4
        and all(map(_is_number, bbox))
        and _is_number(det["score"])
    )


def build_coco_pair(coco_cls, gt: dict, detections: list[dict]):
    """(ground-truth COCO, results COCO) of ``coco_cls`` (pycocotools or faster_coco_eval COCO).

    ``detections`` come from ``load_detections``. The results object is built directly rather
    than through ``loadRes``, which crashes on an empty list.
    """
    dt_dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": detections}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_cls()
        coco_dt.dataset = dt_dataset
        coco_dt.createIndex()
    return coco_gt, coco_dt


def detections_to_coco(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    image_ids: np.ndarray,
    scales: np.ndarray,
    category_ids: Sequence[int],
    tile_offsets: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Batched detections in resized pixels -> COCO results in original-image pixels.

    Args:
      boxes: float [B, K, 4] (x1, y1, x2, y2) in resized (and, for tiles, tile) pixels.
      scores: float [B, K]. classes: int [B, K] 0-based class index. valid: bool [B, K].
      image_ids: int [B]; images with id < 0 are batch padding and are skipped.
      scales: float [B], resized = original * scale.
      category_ids: class index -> COCO category id.
      tile_offsets: optional float [B, 2] (x, y) of each tile in the full original image.
    Returns:
      list of {'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'} (Python scalars).
    """
    boxes = np.asarray(boxes, np.float64)
    scales = np.asarray(scales, np.float64)
    image_ids = np.asarray(image_ids)
    keep = np.asarray(valid, bool) & (image_ids >= 0)[:, None]
    original = boxes / scales[:, None, None]
    if tile_offsets is not None:
        offsets = np.asarray(tile_offsets, np.float64)
        original = original + np.concatenate([offsets, offsets], axis=-1)[:, None, :]
    b, k = np.nonzero(keep)
    x1y1 = original[b, k, :2]
    wh = original[b, k, 2:] - x1y1
    xywh = np.concatenate([x1y1, wh], axis=-1).tolist()
    cats = np.asarray(category_ids)[np.asarray(classes)[b, k]].tolist()
    ids = image_ids[b].tolist()
    score_list = np.asarray(scores, np.float64)[b, k].tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": box, "score": s}
        for i, c, box, s in zip(ids, cats, xywh, score_list)
    ]
