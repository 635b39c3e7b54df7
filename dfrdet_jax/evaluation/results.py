"""COCO ground truth and results I/O, validation, and conversion of model outputs.

Detections travel as ``DetectionArrays`` (columns, no Python object per detection) from the
model's outputs (``detection_arrays``) or a results file / list of dicts (``load_detections``,
which validates either) to the scorers; ``coco_results`` makes the dicts the COCO API needs.

Decisions on bad input (each is deliberate and tested):
  * detection with an ``image_id`` or ``category_id`` absent from the ground truth or not an
    integer, a missing key, a NaN/inf box or score, or a negative width/height:
    ``EvaluationInputError`` naming the source, the record index and the record.
    Zero-width/height detections are legal (they can only be false positives).
  * a results file with zero bytes: ``EvaluationInputError`` (a crashed writer looks like this);
    a file holding ``[]`` or an empty list: valid, every metric with ground truth scores 0.
  * ground-truth box with zero or negative width/height: it can never be matched, so it is
    dropped from scoring and counted in ``skipped['gt_zero_area']`` of the metrics (with a log
    warning), never silently.
  * ground-truth box with NaN/inf coordinates: ``EvaluationInputError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

GroundTruth = str | os.PathLike | dict

_LOG = logging.getLogger(__name__)
_REQUIRED_DET_KEYS = ("image_id", "category_id", "bbox", "score")


class EvaluationInputError(ValueError):
    """Ground truth or detections that cannot be scored as given."""


@dataclasses.dataclass(frozen=True)
class DetectionArrays:
    """N COCO results as columns, in their given order (which breaks score ties, as in COCO).

    image_ids, category_ids: int64 [N]; boxes: float64 [N, 4] (x, y, w, h) in original-image
    px; scores: float [N] (float32 model scores stay float32: every float32 is exact in float64,
    so ranking them is the same).
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def record(self, index: int) -> dict[str, Any]:
        """Result ``index`` as a COCO result dict (Python scalars)."""
        return {
            "image_id": int(self.image_ids[index]),
            "category_id": int(self.category_ids[index]),
            "bbox": self.boxes[index].tolist(),
            "score": float(self.scores[index]),
        }

    def to_coco(self) -> list[dict[str, Any]]:
        """COCO results, one {'image_id', 'category_id', 'bbox', 'score'} dict per detection."""
        return [
            {"image_id": i, "category_id": c, "bbox": box, "score": s}
            for i, c, box, s in zip(
                self.image_ids.tolist(),
                self.category_ids.tolist(),
                self.boxes.tolist(),
                self.scores.astype(np.float64).tolist(),
            )
        ]

    @classmethod
    def concatenate(cls, parts: Sequence[DetectionArrays]) -> DetectionArrays:
        """The detections of ``parts`` one after the other (none: an empty set)."""
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


Detections = str | os.PathLike | Sequence[dict] | DetectionArrays


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


def load_detections(detections: Detections, gt: dict) -> DetectionArrays:
    """Validated detections for ``gt``, as arrays.

    ``detections`` is a COCO results file path, a list of dicts or ``DetectionArrays``; see the
    module docstring for what is rejected (the error names the record, counted from 0).
    """
    if isinstance(detections, DetectionArrays):
        arrays, source, describe = detections, "detections", detections.record
        ids = {"image_id": arrays.image_ids, "category_id": arrays.category_ids}
    else:
        if isinstance(detections, (str, os.PathLike)):
            source = os.fspath(detections)
            detections = _read_json(detections, "Results")
        else:
            source = "detections"
        if not isinstance(detections, (list, tuple)):
            raise EvaluationInputError(f"{source}: COCO results must be a list of dicts")
        if not detections:
            return DetectionArrays.concatenate([])
        ids, describe = _id_columns(detections, source), detections.__getitem__
    for key, known in (
        ("image_id", [img["id"] for img in gt["images"]]),
        ("category_id", [cat["id"] for cat in gt["categories"]]),
    ):
        unknown = ~np.isin(ids[key], np.asarray(known))
        if unknown.any():
            index = int(np.argmax(unknown))
            raise EvaluationInputError(
                f"{source}: record #{index} has {key} {ids[key][index].item()!r} that is not "
                f"in the ground truth: {describe(index)}"
            )
    if not isinstance(detections, DetectionArrays):
        boxes, scores = _check_numbers(
            [d["bbox"] for d in detections], [d["score"] for d in detections], detections, source
        )
        arrays = DetectionArrays(ids["image_id"], ids["category_id"], boxes, scores)
    bad = ~np.isfinite(arrays.boxes).all(axis=1) | ~np.isfinite(arrays.scores)
    if bad.any():
        index = int(np.argmax(bad))
        raise EvaluationInputError(
            f"{source}: record #{index} has a NaN or infinite bbox/score: {describe(index)}"
        )
    negative = (arrays.boxes[:, 2] < 0) | (arrays.boxes[:, 3] < 0)
    if negative.any():
        index = int(np.argmax(negative))
        raise EvaluationInputError(
            f"{source}: record #{index} has a negative width or height: {describe(index)}"
        )
    return arrays


def _id_columns(detections: Sequence, source: str) -> dict[str, np.ndarray]:
    """{'image_id', 'category_id'}: int64 [N] of a list of result dicts, after checking that
    every record has the result keys and integer ids (the COCO API keys images and classes by
    them)."""
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
    ids = {}
    for key in ("image_id", "category_id"):
        ids[key] = np.asarray(columns[key])
        if ids[key].dtype.kind not in "iu":
            index = next(i for i, v in enumerate(columns[key]) if not _is_integer(v))
            raise EvaluationInputError(
                f"{source}: record #{index} needs an integer {key}: {detections[index]}"
            )
        ids[key] = ids[key].astype(np.int64)
    return ids


def _check_numbers(bboxes: list, scores: list, dets: Sequence, source: str):
    """(boxes float64 [N, 4], scores float64 [N]) after checking that they are all numbers."""
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
    return boxes.astype(np.float64), score_array.astype(np.float64)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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


def coco_results(detections: DetectionArrays) -> list[dict[str, Any]]:
    """COCO result dicts with the fields pycocotools' ``loadRes`` adds to box results: area
    (w*h), id (index + 1) and iscrowd 0."""
    areas = (detections.boxes[:, 2] * detections.boxes[:, 3]).tolist()
    return [
        {**record, "area": area, "id": index + 1, "iscrowd": 0}
        for index, (record, area) in enumerate(zip(detections.to_coco(), areas))
    ]


def build_coco_pair(coco_cls, gt: dict, detections: DetectionArrays):
    """(ground-truth COCO, results COCO) of ``coco_cls`` (pycocotools or faster_coco_eval COCO).

    ``detections`` come from ``load_detections``. The results object is built directly rather
    than through ``loadRes``, which crashes on an empty list.
    """
    dt_dataset = {
        "images": gt["images"],
        "categories": gt["categories"],
        "annotations": coco_results(detections),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_cls()
        coco_dt.dataset = dt_dataset
        coco_dt.createIndex()
    return coco_gt, coco_dt


def detection_arrays(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    image_ids: np.ndarray,
    scales: np.ndarray,
    category_ids: Sequence[int],
    tile_offsets: np.ndarray | None = None,
) -> DetectionArrays:
    """Batched detections in resized pixels -> COCO results in original-image pixels.

    Args:
      boxes: float [B, K, 4] (x1, y1, x2, y2) in resized (and, for tiles, tile) pixels.
      scores: float [B, K]. classes: int [B, K] 0-based class index. valid: bool [B, K].
      image_ids: int [B]; images with id < 0 are batch padding and are skipped.
      scales: float [B], resized = original * scale.
      category_ids: class index -> COCO category id.
      tile_offsets: optional float [B, 2] (x, y) of each tile in the full original image.
    Returns:
      The valid detections, image by image in batch order.
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
    scores = np.asarray(scores)
    return DetectionArrays(
        image_ids=image_ids[b].astype(np.int64),
        category_ids=np.asarray(category_ids, np.int64)[np.asarray(classes)[b, k]],
        boxes=np.concatenate([x1y1, original[b, k, 2:] - x1y1], axis=-1),
        scores=scores[b, k] if scores.dtype.kind == "f" else scores[b, k].astype(np.float64),
    )


def detections_to_coco(*args, **kwargs) -> list[dict[str, Any]]:
    """``detection_arrays(*args, **kwargs)`` as COCO result dicts (Python scalars)."""
    return detection_arrays(*args, **kwargs).to_coco()
