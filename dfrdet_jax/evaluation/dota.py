"""DOTA-v2.0 horizontal-box protocol: merge tile predictions, then VOC-style AP50 per class.

Detections arrive as COCO results already shifted to full-image pixels (``detections_to_coco``
adds each tile's offset and the 'image_id' is the full image's). Tiles overlap, so the same
object is found in several tiles: ``merge_tile_detections`` runs class-wise NMS per full image
(IoU threshold 0.3 by default, as the DOTA devkit merges horizontal boxes).

Scoring follows the DOTA devkit's task-2 (horizontal boxes) evaluation: per class, detections
sorted by score, each matched to the unmatched ground truth with the highest IoU in its image;
IoU > 0.5 with a non-difficult box is a TP, with an already matched box a FP, with a difficult
box neither; AP is the area under the all-point interpolated precision/recall curve (VOC2010+).
Ground truth flagged 'difficult', 'ignore' or iscrowd counts as difficult. Unlike the devkit,
IoU uses this project's continuous box convention (no +1 pixel in widths).
"""

from __future__ import annotations

import numpy as np

DOTA_MERGE_NMS_IOU = 0.3
DOTA_MATCH_IOU = 0.5


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes a [N, 4] and b [M, 4], (x1, y1, x2, y2) px; 0 where a union is 0."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; boxes [N, 4] (x1, y1, x2, y2), scores [N]. Returns kept indices, best first.

    A box is suppressed by a kept higher-scoring box when their IoU is > iou_threshold.
    """
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[pairwise_iou(boxes[best : best + 1], boxes[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def merge_tile_detections(
    detections: list[dict], iou_threshold: float = DOTA_MERGE_NMS_IOU
) -> list[dict]:
    """Class-wise NMS per image over full-image COCO results (tiles already shifted back)."""
    groups: dict[tuple, list[int]] = {}
    for index, det in enumerate(detections):
        groups.setdefault((det["image_id"], det["category_id"]), []).append(index)
    merged = []
    for indices in groups.values():
        boxes = _xyxy(np.asarray([detections[i]["bbox"] for i in indices], np.float64))
        scores = np.asarray([detections[i]["score"] for i in indices], np.float64)
        merged.extend(detections[indices[k]] for k in nms(boxes, scores, iou_threshold))
    return merged


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP: area under the monotone envelope of precision(recall)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _is_difficult(ann: dict) -> bool:
    return bool(ann.get("difficult") or ann.get("ignore") or ann.get("iscrowd"))


def class_ap50(gt_anns: list[dict], detections: list[dict]) -> float:
    """VOC AP at IoU > 0.5 for one class; -1 when the class has no non-difficult ground truth."""
    by_image: dict = {}
    for ann in gt_anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    gt_boxes = {i: _xyxy(np.asarray([a["bbox"] for a in anns])) for i, anns in by_image.items()}
    difficult = {i: np.asarray([_is_difficult(a) for a in anns]) for i, anns in by_image.items()}
    matched = {i: np.zeros(len(anns), bool) for i, anns in by_image.items()}
    num_positives = sum(int((~d).sum()) for d in difficult.values())
    if num_positives == 0:
        return -1.0
    scores = np.asarray([d["score"] for d in detections], np.float64)
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, index in enumerate(order):
        det = detections[index]
        image = det["image_id"]
        if image not in gt_boxes:
            fp[rank] = 1
            continue
        box = _xyxy(np.asarray([det["bbox"]], np.float64))
        ious = pairwise_iou(box, gt_boxes[image])[0]
        best = int(np.argmax(ious))
        if ious[best] <= DOTA_MATCH_IOU:
            fp[rank] = 1
        elif difficult[image][best]:
            continue
        elif matched[image][best]:
            fp[rank] = 1
        else:
            matched[image][best] = True
            tp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision)


def evaluate_dota(
    gt: dict, detections: list[dict], merge_iou: float | None = DOTA_MERGE_NMS_IOU
) -> dict:
    """DOTA mAP50: 'mAP50' over classes with ground truth, 'per_class' {name: {'AP50'}}.

    ``merge_iou`` None skips tile merging (detections already merged).
    """
    if merge_iou is not None:
        detections = merge_tile_detections(detections, merge_iou)
    per_class = {}
    for cat in gt["categories"]:
        anns = [a for a in gt["annotations"] if a["category_id"] == cat["id"]]
        dets = [d for d in detections if d["category_id"] == cat["id"]]
        per_class[cat.get("name", str(cat["id"]))] = {"AP50": class_ap50(anns, dets)}
    scored = [m["AP50"] for m in per_class.values() if m["AP50"] > -1]
    metrics = {"mAP50": float(np.mean(scored)) if scored else -1.0}
    summary = (
        f"mAP50 = {100 * metrics['mAP50']:.2f} (VOC all-point AP at IoU > {DOTA_MATCH_IOU}, "
        f"percent, over {len(scored)} classes with ground truth)"
    )
    return {
        **metrics,
        "per_class": per_class,
        "summary": [summary],
        "merged_detections": len(detections),
    }
