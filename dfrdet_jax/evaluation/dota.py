"""DOTA-v2.0 horizontal-box protocol: merge tile predictions, then VOC-style AP50 per class.

Detections arrive as COCO results already shifted to full-image pixels (``detections_to_coco``
adds each tile's offset and the 'image_id' is the full image's). Tiles overlap, so the same
object is found in several tiles: ``merge_tile_detections`` runs class-wise NMS per full image
at the DOTA devkit's IoU threshold for horizontal boxes (DOTA_MERGE_NMS_IOU). The merged
detections are scored here (protocol 'dota') or by the AI-TOD metrics ('dota_aitod', api.py).

Scoring follows the DOTA devkit's task-2 (horizontal boxes) evaluation: per class, detections
sorted by score, each matched to the unmatched ground truth with the highest IoU in its image;
IoU > 0.5 with a non-difficult box is a TP, with an already matched box a FP, with a difficult
box neither; AP is the area under the all-point interpolated precision/recall curve (VOC2010+).
Ground truth flagged 'difficult', 'ignore' or iscrowd counts as difficult.

IoU and NMS are the model's own: dfrdet_jax.ops.boxes.pairwise_iou and
dfrdet_jax.ops.nms.class_wise_nms (float32, this project's continuous box convention: unlike
the devkit, no +1 pixel in widths), jit-compiled on host arrays zero-padded to power-of-two
sizes, so each size compiles once.
"""

from __future__ import annotations

import jax
import numpy as np

from dfrdet_jax.ops import boxes as box_ops
from dfrdet_jax.ops import nms as nms_ops

# DOTA_devkit (github.com/CAPTAIN-WHU/DOTA_devkit) merges horizontal boxes per class and image
# with mergebyrec -> py_cpu_nms (greedy; IoU > thresh is suppressed): ResultMerge.py line 15
# sets nms_thresh = 0.3. AerialDetection (github.com/dingjiansw101/AerialDetection, the code of
# the DOTA-v2.0 benchmarks) keeps 0.3 as mergebyrec's default in its
# DOTA_devkit/ResultMerge_multi_process.py line 216, and tools/parse_results.py line 119 calls it
# so for task 2 (polygons: o_thresh, 0.1 by default). The devkit's own
# ResultMerge_multi_process.py (line 24) has one nms_thresh = 0.1 for both kinds; we follow the
# horizontal-box value of the other two.
DOTA_MERGE_NMS_IOU = 0.3
DOTA_MATCH_IOU = 0.5
# Boxes per IoU and NMS call: memory stays within [block, block] matrices (64 MB of IoU).
_BLOCK = 4096
_MIN_PADDED = 16

# Host arrays are padded to power-of-two sizes, so each size compiles once; they move to and
# from the device explicitly (allowed under jax.transfer_guard("disallow")).
_pairwise_iou = jax.jit(box_ops.pairwise_iou)
_class_wise_nms = jax.jit(
    nms_ops.class_wise_nms,
    static_argnames=("iou_threshold", "score_threshold", "max_detections", "pre_nms_top_k"),
)


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _padded_size(n: int) -> int:
    """The smallest power of two >= n, at least _MIN_PADDED."""
    return max(_MIN_PADDED, 1 << max(n - 1, 0).bit_length())


def _pad(boxes: np.ndarray, size: int) -> np.ndarray:
    """boxes [n, 4] -> float32 [size, 4]: zero boxes (IoU 0 with anything) after the n real ones."""
    padded = np.zeros((size, 4), np.float32)
    padded[: len(boxes)] = boxes
    return padded


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ops.boxes.pairwise_iou of host boxes a [N, 4] and b [M, 4] (xyxy px) -> float32 [N, M].

    a goes in blocks of _BLOCK rows; b whole.
    """
    b_padded = jax.device_put(_pad(b, _padded_size(len(b))))
    rows = []
    for start in range(0, len(a), _BLOCK):
        block = a[start : start + _BLOCK]
        a_padded = jax.device_put(_pad(block, _padded_size(len(block))))
        rows.append(jax.device_get(_pairwise_iou(a_padded, b_padded))[: len(block), : len(b)])
    return np.concatenate(rows) if rows else np.zeros((0, len(b)), np.float32)


def _greedy_keep(boxes: np.ndarray, candidate: np.ndarray, iou_threshold: float) -> np.ndarray:
    """bool [n]: the candidates of boxes [n, 4] (best first, n <= _BLOCK) that greedy NMS keeps.

    ops.nms.class_wise_nms returns boxes, not indices: it gets the reversed rank as score, so
    the scores it returns name the kept boxes.
    """
    n, size = len(boxes), _padded_size(len(boxes))
    valid = np.zeros(size, bool)
    valid[:n] = candidate
    inputs = jax.device_put(
        (
            _pad(boxes, size),
            np.arange(size, 0, -1, dtype=np.float32),  # size - rank: distinct, exact in float32
            np.zeros(size, np.int32),
            valid,
        )
    )
    kept = jax.device_get(
        _class_wise_nms(
            *inputs,
            iou_threshold=iou_threshold,
            score_threshold=0.0,
            max_detections=size,
            pre_nms_top_k=size,
        )
    )
    ranks = size - kept.scores[kept.valid].astype(np.int64)
    keep = np.zeros(n, bool)
    keep[ranks] = True
    return keep


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS of one class; boxes [N, 4] (x1, y1, x2, y2) px, scores [N]. Returns kept
    indices int64 [K], best first.

    A box is suppressed by a kept higher-scoring box (equal scores: the lower index ranks
    higher) when their IoU is > iou_threshold. This is ops.nms.class_wise_nms (float32 IoU of
    ops.boxes) for any N: boxes go in rank order in blocks of _BLOCK; a block first loses the
    boxes that kept boxes of earlier blocks suppress, then class_wise_nms decides the rest.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(boxes, np.float32).reshape(-1, 4)[order]
    keep = np.zeros(len(order), bool)
    for start in range(0, len(order), _BLOCK):
        block = ranked[start : start + _BLOCK]
        earlier = ranked[:start][keep[:start]]
        candidate = ~(_iou(earlier, block) > iou_threshold).any(axis=0)
        keep[start : start + len(block)] = _greedy_keep(block, candidate, iou_threshold)
    return order[keep]


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
    num_positives = sum(int((~d).sum()) for d in difficult.values())
    if num_positives == 0:
        return -1.0
    scores = np.asarray([d["score"] for d in detections], np.float64)
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    # Images are matched independently: each image's detections, in rank order, against its
    # unmatched ground truth.
    ranks_of_image: dict = {}
    for rank, index in enumerate(order):
        ranks_of_image.setdefault(detections[index]["image_id"], []).append(rank)
    for image, ranks in ranks_of_image.items():
        if image not in gt_boxes:
            fp[ranks] = 1
            continue
        boxes = _xyxy(np.asarray([detections[order[r]]["bbox"] for r in ranks], np.float64))
        matched = np.zeros(len(gt_boxes[image]), bool)
        for rank, ious in zip(ranks, _iou(boxes, gt_boxes[image])):
            best = int(np.argmax(ious))
            if ious[best] <= DOTA_MATCH_IOU:
                fp[rank] = 1
            elif difficult[image][best]:
                continue
            elif matched[best]:
                fp[rank] = 1
            else:
                matched[best] = True
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
