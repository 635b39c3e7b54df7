"""COCOeval ('bbox') on arrays: pycocotools' evaluateImg and accumulate, vectorised in numpy.

The same numbers as pycocotools' COCOeval (and faster_coco_eval, which reproduces it) without a
Python object per detection, and in memory bounded by the number of detections. References are
to pycocotools/cocoeval.py 2.0 (``evaluateImg``, ``accumulate``), whose rules are:

  * per image and category, the detections sorted by descending score with a stable sort (ties
    keep the results' order), the first max(maxDets) kept; the ground truth sorted stably with
    the non-ignored boxes first. A box is ignored when iscrowd (a dataset's 'ignore' field is
    overwritten by iscrowd in ``_prepare``) or when its 'area' field is outside the area range,
    which is inclusive at both ends.
  * overlap: IoU, but intersection over the detection's area for a crowd box (maskApi.c bbIou).
  * matching, per IoU threshold t, detection by detection in rank order: the candidates are the
    boxes with overlap >= min(t, 1 - 1e-10) that are unmatched at t or crowd (a crowd box takes
    any number of detections); the detection takes the non-ignored candidate of highest overlap
    if there is one, else the ignored candidate of highest overlap, a tie going to the box later
    in the sorted order (the loop replaces its best on an equal overlap).
  * a detection matched to an ignored box, or unmatched with its w*h outside the area range,
    is ignored; a matched one is a TP, an unmatched one a FP.
  * accumulate, per category, area range and maxDets m: each image's first m detections, in
    image-id order, merged by a stable sort on descending score; cumulative TP and FP counts,
    recall = TP / npig (the non-ignored boxes), precision TP / (TP + FP + eps) made
    non-increasing from the right and read at the first rank whose recall reaches each of 101
    thresholds (0 past the last rank); recall is the final one. -1 where npig = 0.

One deliberate difference: annotation ids play no part here. COCOeval records a match by the
ground truth's id, so an annotation with id 0 reads as unmatched there (pycocotools counts its
TPs as FPs; faster_coco_eval warns, and its per-image layout then defeats oLRP); here its TPs
count, as they would under any other id.

How it is vectorised: a detection's matching only depends on the detections ranked above it in
its image and category, and only on boxes it overlaps by at least the lowest threshold. So the
(detection, box) pairs with such an overlap are found first, chunk of images by chunk, and only
the detections in such a pair are matched, step by step over their rank among them: each step
decides the next detection of every (image, category) at once, for every area range and
threshold, with numpy. What is kept per detection is its score, rank, TP / FP bits per
threshold (one integer per area range) and its IoU if a TP (for oLRP), whatever the chunk, so
memory grows by about 45 bytes per detection beyond the input arrays. Precision and recall
are then read off the TPs alone: recall only grows at a TP, and precision is highest there, so
the interpolated curve needs the FP count before each TP, nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfrdet_jax.evaluation import lrp
from dfrdet_jax.evaluation.results import DetectionArrays

# COCOeval's Params.recThrs, computed the same way so that recalls compare identically.
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
# Detections per chunk of images (at least one image), and (detection, box) pairs whose overlap
# is computed at once: what bounds the working memory beyond the per-detection results.
_CHUNK_DETECTIONS = 1 << 20
_PAIR_BLOCK = 1 << 20


def box_overlap(dets: np.ndarray, gts: np.ndarray, crowd) -> np.ndarray:
    """COCO's box overlap of dets and gts, [..., 4] (x, y, w, h) px broadcast against each other:
    IoU, or intersection over the detection's area where ``crowd`` (bool, broadcast) is True.

    Float64 in maskApi.c bbIou's order of operations, so values on a threshold compare the same;
    0 without overlap.
    """
    d_lo, g_lo = dets[..., :2], gts[..., :2]
    wh = np.minimum(d_lo + dets[..., 2:], g_lo + gts[..., 2:]) - np.maximum(d_lo, g_lo)
    inter = np.where((wh > 0).all(axis=-1), wh[..., 0] * wh[..., 1], 0.0)
    d_area = dets[..., 2] * dets[..., 3]
    union = np.where(crowd, d_area, d_area + gts[..., 2] * gts[..., 3] - inter)
    return np.divide(inter, union, out=np.zeros(inter.shape), where=inter > 0)


@dataclasses.dataclass(frozen=True)
class _Params:
    """COCOeval's Params as arrays. area: float [A, 2] inclusive (lo, hi) on gt 'area' / det w*h;
    thresholds: float [T]; max_dets: [M] ints; lrp_areas: indices into area, [L]."""

    area: np.ndarray
    thresholds: np.ndarray
    max_dets: tuple[int, ...]
    lrp_areas: tuple[int, ...]

    @property
    def bits(self):
        """The unsigned integer type holding one bit per threshold."""
        for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
            if len(self.thresholds) <= 8 * np.dtype(dtype).itemsize:
                return dtype
        raise ValueError(f"At most 64 IoU thresholds, not {len(self.thresholds)}")


@dataclasses.dataclass(frozen=True)
class _GroundTruth:
    """Validated COCO ground truth as arrays, G boxes in file order (which breaks ties)."""

    image_ids: np.ndarray  # int64 [I], sorted: COCOeval's imgIds
    category_ids: np.ndarray  # int64 [K], sorted: catIds
    image: np.ndarray  # int64 [G], index into image_ids
    category: np.ndarray  # int64 [G], index into category_ids
    boxes: np.ndarray  # float64 [G, 4] (x, y, w, h) px
    area: np.ndarray  # float64 [G], the 'area' field (px^2) the area ranges apply to
    crowd: np.ndarray  # bool [G]

    @classmethod
    def from_coco(cls, gt: dict) -> _GroundTruth:
        anns = gt["annotations"]
        image_ids = np.unique(np.asarray([img["id"] for img in gt["images"]], np.int64))
        category_ids = np.unique(np.asarray([cat["id"] for cat in gt["categories"]], np.int64))
        return cls(
            image_ids=image_ids,
            category_ids=category_ids,
            image=np.searchsorted(image_ids, np.asarray([a["image_id"] for a in anns], np.int64)),
            category=np.searchsorted(
                category_ids, np.asarray([a["category_id"] for a in anns], np.int64)
            ),
            boxes=np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4),
            area=np.asarray([a["area"] for a in anns], np.float64),
            crowd=np.asarray([bool(a["iscrowd"]) for a in anns], bool),
        )


def evaluate(
    gt: dict,
    detections: DetectionArrays,
    *,
    area_ranges: dict[str, tuple[float, float]],
    max_dets: tuple[int, ...],
    iou_thresholds: np.ndarray,
    lrp_areas: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """COCOeval ('bbox') of validated ``detections`` against validated ``gt`` (results module).

    Args:
      area_ranges: {label: (lo, hi)} px^2, inclusive; max_dets: increasing; iou_thresholds: [T].
      lrp_areas: labels of area_ranges whose oLRP (lrp.py) to compute.
    Returns:
      (precision float64 [T, R, K, A, M], recall float64 [T, K, A, M], oLRP parts
      {lrp.OLRP_PARTS: float64 [K, A]}, -1 outside lrp_areas; {} without lrp_areas) as
      COCOeval's accumulate (and the official AI-TOD oLRP), K over the sorted category ids.
    """
    ground_truth = _GroundTruth.from_coco(gt)
    params = _Params(
        area=np.asarray(list(area_ranges.values()), np.float64).reshape(-1, 2),
        thresholds=np.asarray(iou_thresholds, np.float64),
        max_dets=tuple(int(m) for m in max_dets),
        lrp_areas=tuple(list(area_ranges).index(label) for label in lrp_areas),
    )
    per_category = _match(ground_truth, detections, params)
    return _accumulate(ground_truth, per_category, params)


def _match(gt: _GroundTruth, dets: DetectionArrays, params: _Params) -> list[list[dict]]:
    """Per category k, the kept detections (rank < max(maxDets) in their image) in image-id
    then rank order, one dict per chunk of images: {'score' [N], 'rank' [N], 'tp' and 'fp'
    [N, A] threshold bits, 'tp_iou' [N, L] (each TP's IoU at the first threshold, in the lrp
    areas)}."""
    num_images = len(gt.image_ids)
    image_of_det = np.searchsorted(gt.image_ids, dets.image_ids)
    det_starts = np.concatenate([[0], np.cumsum(np.bincount(image_of_det, minlength=num_images))])
    del image_of_det
    by_image = np.argsort(dets.image_ids, kind="stable")  # each image's in the results' order
    gt_by_image = np.argsort(gt.image, kind="stable")  # each image's in file order
    gt_starts = np.searchsorted(gt.image[gt_by_image], np.arange(num_images + 1))
    parts: list[list[dict]] = [[] for _ in gt.category_ids]
    first = 0
    while first < num_images:
        # The images up to _CHUNK_DETECTIONS detections (at least one image).
        last = int(np.searchsorted(det_starts, det_starts[first] + _CHUNK_DETECTIONS, "right"))
        last = min(max(last - 1, first + 1), num_images)
        chunk = _match_chunk(
            gt,
            gt_by_image[gt_starts[first] : gt_starts[last]],
            dets,
            by_image[det_starts[first] : det_starts[last]],
            params,
        )
        category = chunk.pop("category")
        bounds = np.searchsorted(category, np.arange(len(parts) + 1))
        for k, part in enumerate(parts):
            part.append({key: value[bounds[k] : bounds[k + 1]] for key, value in chunk.items()})
        first = last
    return parts


def _match_chunk(
    gt: _GroundTruth, gt_index: np.ndarray, dets: DetectionArrays, det_index, params: _Params
) -> dict[str, np.ndarray]:
    """evaluateImg of some images: gt_index and det_index select their boxes and detections.

    Returns the kept detections sorted by category, then image, then rank: 'category' [N] and
    the fields of ``_match``.
    """
    num_categories = len(gt.category_ids)
    # Detections by (image, category) group, then descending score; ties keep the results'
    # order (det_index has each image's detections in that order; both sorts are stable).
    group = np.searchsorted(gt.image_ids, dets.image_ids[det_index]) * num_categories
    group += np.searchsorted(gt.category_ids, dets.category_ids[det_index])
    order = np.argsort(-dets.scores[det_index], kind="stable")
    order = order[np.argsort(group[order], kind="stable")]
    det_index, group = det_index[order], group[order]
    rank = _rank_in_run(group)
    kept = rank < params.max_dets[-1]
    det_index, group, rank = det_index[kept], group[kept], rank[kept]
    boxes = dets.boxes[det_index]
    # The chunk's boxes by group, each group's in file order.
    gt_group = gt.image[gt_index] * num_categories + gt.category[gt_index]
    order = np.argsort(gt_group, kind="stable")
    gt_index, gt_group = gt_index[order], gt_group[order]
    lo, hi = params.area[:, 0], params.area[:, 1]
    crowd = gt.crowd[gt_index]
    gt_area = gt.area[gt_index][:, None]
    regular = ~crowd[:, None] & (gt_area >= lo) & (gt_area <= hi)  # [G, A] not ignored

    pair_det, pair_gt, pair_iou = _candidate_pairs(
        boxes, group, gt.boxes[gt_index], crowd, gt_group, params.thresholds
    )
    matched, on_ignored, tp_iou = _greedy_match(
        len(det_index), group, pair_det, pair_gt, pair_iou, crowd, regular, params
    )
    det_area = (boxes[:, 2] * boxes[:, 3])[:, None]
    outside = (det_area < lo) | (det_area > hi)  # [N, A]
    every = params.bits((1 << len(params.thresholds)) - 1)
    category = group % num_categories
    order = np.argsort(category, kind="stable")
    return {
        "category": category[order],
        "score": dets.scores[det_index][order],
        "rank": rank[order].astype(np.min_scalar_type(params.max_dets[-1])),
        "tp": (matched & ~on_ignored)[order],
        "fp": np.where(outside, 0, every & ~matched).astype(params.bits)[order],
        "tp_iou": tp_iou[order],
    }


def _rank_in_run(keys: np.ndarray) -> np.ndarray:
    """int64 [N]: each element's position within its run of equal consecutive keys [N]."""
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    runs = np.diff(np.append(starts, len(keys)))
    return np.arange(len(keys)) - np.repeat(starts, runs)


def _candidate_pairs(boxes, group, gt_boxes, crowd, gt_group, thresholds):
    """(detection [P], box [P], overlap [P]): the pairs of a detection (boxes [N, 4], group [N])
    and a box of its group (gt_boxes [G, 4], crowd [G], gt_group [G] sorted) that overlap by at
    least the lowest threshold, sorted by detection, then box."""
    first = np.searchsorted(gt_group, group, "left")
    count = np.searchsorted(gt_group, group, "right") - first
    ends = np.cumsum(count)
    lowest = min(float(np.min(thresholds)), 1 - 1e-10) if len(thresholds) else np.inf
    pairs = []
    start = 0
    while start < len(group):  # blocks of about _PAIR_BLOCK pairs (at least one detection)
        before = ends[start] - count[start]
        stop = max(int(np.searchsorted(ends, before + _PAIR_BLOCK, "right")), start + 1)
        det = np.repeat(np.arange(start, stop), count[start:stop])
        box = np.arange(len(det)) - np.repeat(
            ends[start:stop] - count[start:stop] - before, count[start:stop]
        )
        box += first[det]
        overlap = box_overlap(boxes[det], gt_boxes[box], crowd[box])
        keep = overlap >= lowest
        pairs.append((det[keep], box[keep], overlap[keep]))
        start = stop
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(column) for column in zip(*pairs))


def _greedy_match(num_dets, group, pair_det, pair_gt, pair_iou, crowd, regular, params):
    """evaluateImg's matching of a chunk's N kept detections (group [N], sorted by group and
    rank) given their candidate pairs (``_candidate_pairs``), crowd [G] and regular [G, A] (not
    ignored in the area range).

    Returns (matched [N, A], matched to an ignored box [N, A]) as threshold bits, and tp_iou
    float64 [N, L]: the IoU of each TP at the first threshold in the lrp areas (else 0).
    """
    num_areas, num_thresholds = regular.shape[1], len(params.thresholds)
    matched = np.zeros((num_dets, num_areas), params.bits)
    on_ignored = np.zeros((num_dets, num_areas), params.bits)
    tp_iou = np.zeros((num_dets, len(params.lrp_areas)))
    if not len(pair_det):
        return matched, on_ignored, tp_iou
    # Step s decides every group's s-th candidate detection (by rank) at once. Each detection's
    # pairs are sorted by overlap, then box order, so the last valid pair is the one the loop
    # of evaluateImg ends on.
    step = np.zeros(num_dets, np.int64)
    candidates = pair_det[np.concatenate([[True], pair_det[1:] != pair_det[:-1]])]
    step[candidates] = _rank_in_run(group[candidates])
    order = np.lexsort((pair_gt, pair_iou, pair_det, step[pair_det]))
    pair_det, pair_gt, pair_iou = pair_det[order], pair_gt[order], pair_iou[order]
    passes = pair_iou[:, None] >= np.minimum(params.thresholds, 1 - 1e-10)  # [P, T]
    run_start = np.flatnonzero(np.concatenate([[True], pair_det[1:] != pair_det[:-1]]))
    run_det = pair_det[run_start]
    step_runs = np.searchsorted(step[run_det], np.arange(step[run_det].max() + 2))
    run_start = np.append(run_start, len(pair_det))
    taken = np.zeros((len(crowd), num_areas, num_thresholds), bool)  # gtm > 0
    weights = (1 << np.arange(num_thresholds)).astype(params.bits)
    for r0, r1 in zip(step_runs[:-1], step_runs[1:]):
        p0, p1 = run_start[r0], run_start[r1]
        box, size = pair_gt[p0:p1], p1 - p0
        free = ~taken[box] | crowd[box][:, None, None]
        valid = free & passes[p0:p1, None, :]  # [p, A, T]
        # The last valid pair, on a regular box if any: keys above `size` are regular boxes.
        key = np.where(valid, np.arange(size)[:, None, None] + size * regular[box][..., None], -1)
        best = np.maximum.reduceat(key, run_start[r0:r1] - p0, axis=0)  # [d, A, T]
        hit, on_regular = best >= 0, best >= size
        chosen = np.where(on_regular, best - size, best)
        d, a, t = np.nonzero(hit)
        taken[box[chosen[d, a, t]], a, t] = True
        dets = run_det[r0:r1]
        matched[dets] = (hit * weights).sum(axis=-1, dtype=params.bits)
        on_ignored[dets] = ((hit & ~on_regular) * weights).sum(axis=-1, dtype=params.bits)
        for column, area in enumerate(params.lrp_areas):
            tp = on_regular[:, area, 0]
            tp_iou[dets[tp], column] = pair_iou[p0:p1][chosen[tp, area, 0]]
    return matched, on_ignored, tp_iou


def _accumulate(gt: _GroundTruth, per_category: list, params: _Params):
    """``evaluate``'s (precision, recall, oLRP parts) from ``_match``'s per-category results."""
    num_t, num_r = len(params.thresholds), len(RECALL_THRESHOLDS)
    num_k, num_a, num_m = len(gt.category_ids), len(params.area), len(params.max_dets)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
    recall = -np.ones((num_t, num_k, num_a, num_m))
    parts = np.full((len(lrp.OLRP_PARTS), num_k, num_a), -1.0)
    regular = ~gt.crowd[:, None] & (gt.area[:, None] >= params.area[:, 0])
    regular &= gt.area[:, None] <= params.area[:, 1]
    npig = np.stack(
        [np.bincount(gt.category[regular[:, a]], minlength=num_k) for a in range(num_a)], -1
    )  # [K, A]
    for k in range(num_k):
        chunks, per_category[k] = per_category[k], None  # one category's copy at a time
        if not chunks:  # no image at all
            continue
        found = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
        del chunks
        order = np.argsort(-found["score"], kind="stable")
        score, rank = found["score"][order], found["rank"][order]
        for a in np.flatnonzero(npig[k] > 0):
            tp, fp = found["tp"][order, a], found["fp"][order, a]
            kept_before = -1
            for m, max_det in enumerate(params.max_dets):
                kept = rank < max_det
                if kept.sum() == kept_before:  # the same detections as the previous maxDets
                    precision[..., k, a, m] = precision[..., k, a, m - 1]
                    recall[:, k, a, m] = recall[:, k, a, m - 1]
                    continue
                kept_before = kept.sum()
                tp_m, fp_m = tp[kept], fp[kept]
                scored = (tp_m | fp_m) != 0  # the others are ignored at every threshold
                tp_m, fp_m = tp_m[scored], fp_m[scored]
                for t in range(num_t):
                    fp_before = np.cumsum((fp_m >> t) & 1)[np.flatnonzero((tp_m >> t) & 1)]
                    curve, final = _interpolated_precision(fp_before, npig[k, a])
                    precision[t, :, k, a, m], recall[t, k, a, m] = curve, final
            if a in params.lrp_areas:
                tp_iou = found["tp_iou"][order, params.lrp_areas.index(a)]
                tps, fps = (tp & 1).astype(bool), (fp & 1).astype(bool)
                parts[:, k, a] = lrp.olrp(score, tps, fps, tp_iou, npig[k, a], params.thresholds[0])
    lrp_arrays = dict(zip(lrp.OLRP_PARTS, parts)) if params.lrp_areas else {}
    return precision, recall, lrp_arrays


def _interpolated_precision(fp_before: np.ndarray, npig: int) -> tuple[np.ndarray, float]:
    """(precision [R] at RECALL_THRESHOLDS, final recall) of one category, area range, maxDets
    and threshold from the number of FPs ranked above each of its TPs [n_tp] and npig > 0.

    Recall only grows at a TP, so the first rank reaching a recall threshold is a TP's, and the
    precision after a FP is below the one at the TP before it, so the non-increasing envelope
    at a TP is the maximum over the TPs from it on: the TPs alone give accumulate's numbers,
    with its operations (tp / npig, tp / (fp + tp + eps)).
    """
    tp = np.arange(1, len(fp_before) + 1, dtype=np.float64)
    rc = tp / npig
    pr = tp / (fp_before + tp + np.spacing(1))
    envelope = np.maximum.accumulate(pr[::-1])[::-1]
    index = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
    curve = np.zeros(len(RECALL_THRESHOLDS))
    reached = index < len(tp)
    curve[reached] = envelope[index[reached]]
    return curve, float(rc[-1]) if len(tp) else 0.0
