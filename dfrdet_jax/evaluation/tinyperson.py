"""TinyPerson protocol: AP and AR on COCOeval (any backend of coco_tiny), miss rate in numpy.

Follows the official TinyBenchmark evaluation (github.com/ucas-vg/TinyBenchmark,
tiny_benchmark/MyPackage/tools/evaluate/evaluate_tiny.py: ``evaluate_ap`` with
``ignore_uncertain=True, use_iod_for_ignore=True, eval_standard='tiny'`` and ``evaluate_mr``).
Ignore regions are annotations with a truthy 'ignore' or 'uncertain' field, or iscrowd=1
(TinyPerson's files mark crowds, ambiguous regions and reflections 'ignore', with iscrowd 0).
Intersection over the detection's area is IoD; t is the IoU threshold being scored.

AP and AR (maskrcnn_benchmark/data/datasets/evaluation/coco/cocoeval.py: ``Params`` 'tiny',
``evaluateImg``, ``summarize``):
  * IoU thresholds 0.25, 0.5, 0.75; max detections 200 per image; AP and AR at each threshold
    for each size range.
  * size ranges on sqrt(GT 'area') in px, inclusive at both ends:
    all [1, 1e5], tiny [1, 20], tiny1 [1, 8], tiny2 [8, 12], tiny3 [12, 20], small [20, 32],
    reasonable [32, 1e5]. (The paper writes the lower bound as 2, as the official MR code
    does; its AP code uses 1.)
  * in a range, the ignored ground truth is the ignore regions and every person outside the
    range. A detection not matched at IoU >= t to a person of the range is neither TP nor FP
    when its IoD with an ignored box is >= t (the official ``IOD_by_IOU`` fallback, which derives
    IoD from IoU and the 'area' field: exact for TinyPerson, whose boxes have iscrowd 0 and area
    w h), so a detection on a person of another size is ignored, not a false positive.
    Unmatched detections whose area is outside the range are ignored too (COCO's rule, kept by
    the official code). COCOeval applies exactly this IoD rule to crowd boxes, so each range is
    one COCOeval run in which its ignored ground truth is passed as iscrowd=1.

Miss rate (third/Cityscapes/evaluation/eval_script/eval_MR_multisetup.py, as cityperson_eval.py
calls it with ``filter_type='size'``):
  * setups on sqrt(GT 'area') in px, inclusive: tiny1 [2, 8], tiny2 [8, 12], tiny3 [12, 20],
    tiny [2, 20], small [20, 32], all [-1, 1e10] (``Params.HtRng``; its visibility range passes
    every box without a 'vis' field, as TinyPerson's); IoU thresholds 0.25, 0.5, 0.75.
  * per image and class the 1,000 best detections; of those only the ones with
    sqrt(w h) in [lo / 1.25, hi * 1.25) are scored (``expFilter``), the others are dropped.
  * ignored ground truth as above: ignore regions (the official MR code reads only 'ignore' and
    'uncertain'; crowd boxes, which TinyPerson lacks, are regions here too) and persons outside
    the setup. A detection takes the free non-ignored person of highest IoU >= t (a TP; each
    person once); failing that, it is ignored when its IoD with an ignored box is >= t or when
    the official fallback (see ``_mr_image``) exceeds 0.5; otherwise it is a FP.
  * MR = 1 - recall at 9 FPPI (false positives per image, over all images) points log-spaced
    in [0.01, 1], averaged geometrically over the points and the classes with ground truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfrdet_jax.evaluation import array_cocoeval, coco_tiny, results

TINYPERSON_AREA_RANGES = {
    "all": (1.0**2, 1e5**2),
    "tiny": (1.0**2, 20.0**2),
    "tiny1": (1.0**2, 8.0**2),
    "tiny2": (8.0**2, 12.0**2),
    "tiny3": (12.0**2, 20.0**2),
    "small": (20.0**2, 32.0**2),
    "reasonable": (32.0**2, 1e5**2),
}
TINYPERSON_IOU_THRESHOLDS = np.array([0.25, 0.5, 0.75])
TINYPERSON_MAX_DETS = (200,)

# Miss rate: size setups on sqrt(area) in px (not area), its own detection cap and size margin.
TINYPERSON_MR_SIZE_RANGES = {
    "tiny1": (2.0, 8.0),
    "tiny2": (8.0, 12.0),
    "tiny3": (12.0, 20.0),
    "tiny": (2.0, 20.0),
    "small": (20.0, 32.0),
    "all": (-1.0, 1e5**2),
}
MR_MAX_DETS = 1000
MR_SIZE_MARGIN = 1.25
MR_FALLBACK_THRESHOLD = 0.5
# The official get_fppi(0.01, 1., 9), computed the same way so points compare identically.
MR_FPPI = np.exp(np.arange(np.log(0.01), np.log(1.0) + 1e-10, np.log(1.0 / 0.01) / 8))


def mark_ignore_regions(gt: dict) -> int:
    """Sets iscrowd=1 on ignore/uncertain annotations of ``gt`` (in place); returns their count."""
    count = 0
    for ann in gt["annotations"]:
        if ann.get("ignore") or ann.get("uncertain") or ann.get("iscrowd"):
            ann["iscrowd"] = 1
            count += 1
    return count


def _run_ranges(
    gt: dict, detections: results.DetectionArrays, backend: str
) -> coco_tiny.CocoArrays:
    """COCOeval arrays of every size range, each from its own run with the persons outside the
    range as crowd boxes (ignore regions already are); areas A in TINYPERSON_AREA_RANGES order."""
    runs = []
    for name, (lo, hi) in TINYPERSON_AREA_RANGES.items():
        annotations = [
            ann if lo <= ann["area"] <= hi else {**ann, "iscrowd": 1} for ann in gt["annotations"]
        ]
        runs.append(
            coco_tiny.run_cocoeval(
                {**gt, "annotations": annotations},
                detections,
                area_ranges={name: (lo, hi)},
                max_dets=TINYPERSON_MAX_DETS,
                iou_thresholds=TINYPERSON_IOU_THRESHOLDS,
                backend=backend,
            )
        )
    return dataclasses.replace(
        runs[0],
        precision=np.concatenate([run.precision for run in runs], axis=3),
        recall=np.concatenate([run.recall for run in runs], axis=2),
        area_labels=list(TINYPERSON_AREA_RANGES),
    )


def _greedy_match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """bool [D]: detections (rows of iou [D, G], best score first) matched at IoU >= threshold.

    Each takes its highest-IoU free ground truth, each ground truth once; on a tie the later
    one, as the official loop (``if ious < bstOa: continue``) lets an equal IoU replace.
    """
    free = np.ones(iou.shape[1], bool)
    matched = np.zeros(iou.shape[0], bool)
    for d in np.nonzero((iou >= threshold).any(axis=1))[0]:
        candidates = np.where(free, iou[d], -1.0)
        g = len(candidates) - 1 - int(np.argmax(candidates[::-1]))
        if candidates[g] >= threshold:
            matched[d] = True
            free[g] = False
    return matched


def _mr_image(gts: list[dict], dets: list[dict]) -> list[tuple]:
    """One image and class, per MR setup: (scores [D], tp [T, D], fp [T, D], positives) of its
    scored detections (best first) and its number of non-ignored persons."""
    dets = sorted(dets, key=lambda d: -d["score"])[:MR_MAX_DETS]  # stable, as mergesort
    det_boxes = np.asarray([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
    gt_boxes = np.asarray([g["bbox"] for g in gts], np.float64).reshape(-1, 4)
    scores = np.asarray([d["score"] for d in dets], np.float64)
    pairs = (det_boxes[:, None], gt_boxes[None])
    iou, iod = array_cocoeval.box_overlap(*pairs, False), array_cocoeval.box_overlap(*pairs, True)
    det_area = det_boxes[:, 2] * det_boxes[:, 3]
    gt_area = np.asarray([g["area"] for g in gts], np.float64)
    region = np.asarray([bool(g["iscrowd"]) for g in gts], bool)
    # The official fallback (IOD_by_IOU) turns an IoU x into an IoD as x / (1 + x) (1 + G / D)
    # (G the box's 'area', D the detection's), but its computeIoU already scored every ignored
    # box by IoD, so it applies the conversion to an IoD: a looser test than IoD > 0.5 (a
    # detection 10% inside a region 10x its size passes). Kept, as published MRs come from it.
    with np.errstate(divide="ignore", invalid="ignore"):
        fallback = iod / (1 + iod) * (1 + gt_area[None, :] / det_area[:, None])
    fallback = np.where(iod > 0, fallback, 0.0)
    gt_size, det_size = np.sqrt(gt_area), np.sqrt(det_area)
    results = []
    for lo, hi in TINYPERSON_MR_SIZE_RANGES.values():
        ignored = region | (gt_size < lo) | (gt_size > hi)
        keep = (det_size >= lo / MR_SIZE_MARGIN) & (det_size < hi * MR_SIZE_MARGIN)
        on_regular = iou[keep][:, ~ignored]
        on_ignored = iod[keep][:, ignored]
        loose = (fallback[keep][:, ignored] > MR_FALLBACK_THRESHOLD).any(axis=1)
        tp = np.stack([_greedy_match(on_regular, t) for t in TINYPERSON_IOU_THRESHOLDS])
        ignore = np.stack([(on_ignored >= t).any(axis=1) for t in TINYPERSON_IOU_THRESHOLDS])
        results.append((scores[keep], tp, ~tp & ~(ignore | loose), int((~ignored).sum())))
    return results


def _recall_at_fppi(
    scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, positives: int, num_images: int
) -> np.ndarray:
    """Recall [T, R] at the MR_FPPI points of one class's scored detections over all images:
    scores [D], tp and fp bool [T, D] (neither: ignored), positives > 0."""
    out = np.zeros((len(tp), len(MR_FPPI)))
    if not len(scores):
        return out
    order = np.argsort(-scores, kind="mergesort")
    recall = np.cumsum(tp[:, order], axis=1) / positives
    fppi = np.cumsum(fp[:, order], axis=1) / num_images
    for t in range(len(tp)):
        index = np.searchsorted(fppi[t], MR_FPPI, side="right") - 1
        # Below the first FPPI reached no detection is allowed: recall 0. (The official code
        # reads recall[-1] there, Python's last element; that needs fewer than 100 images, as
        # the first FPPI is >= 1 / images, and TinyPerson's test split has 786.)
        out[t] = np.where(index >= 0, recall[t, index], 0.0)
    return out


def _miss_rate_arrays(gt: dict, detections: list[dict]) -> np.ndarray:
    """Recall [S, T, K, R] at the MR_FPPI points for setups S, IoU thresholds T and classes K
    (sorted ids); -1 where a class has no non-ignored person in a setup."""
    category_ids = sorted(cat["id"] for cat in gt["categories"])
    image_ids = sorted({img["id"] for img in gt["images"]})
    gts_of, dets_of = {}, {}
    for ann in gt["annotations"]:
        gts_of.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
    for det in detections:
        dets_of.setdefault((det["image_id"], det["category_id"]), []).append(det)
    num_setups, num_ious = len(TINYPERSON_MR_SIZE_RANGES), len(TINYPERSON_IOU_THRESHOLDS)
    recall = -np.ones((num_setups, num_ious, len(category_ids), len(MR_FPPI)))
    for k, category in enumerate(category_ids):
        images = [
            _mr_image(gts_of.get((i, category), []), dets_of.get((i, category), []))
            for i in image_ids
            if (i, category) in gts_of or (i, category) in dets_of
        ]
        for s in range(num_setups):
            per_image = [image[s] for image in images]
            positives = sum(p for *_, p in per_image)
            if positives:
                recall[s, :, k] = _recall_at_fppi(
                    np.concatenate([image[0] for image in per_image]),
                    np.concatenate([image[1] for image in per_image], axis=1),
                    np.concatenate([image[2] for image in per_image], axis=1),
                    positives,
                    len(image_ids),
                )
    return recall


def _log_average_miss_rate(recall: np.ndarray) -> float:
    """exp(mean(log(1 - recall))) over the entries > -1 (0 if any recall is 1), else -1."""
    miss = 1 - recall[recall > -1]
    if not miss.size:
        return -1.0
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(miss))))


def _mr_metrics(recall: np.ndarray, category=None) -> dict[str, float]:
    """'MR{25,50,75}_{setup}' of recall [S, T, K, R] (category: index into K or None for all)."""
    k = slice(None) if category is None else category
    return {
        f"MR{round(iou * 100)}_{setup}": _log_average_miss_rate(recall[s, t, k])
        for t, iou in enumerate(TINYPERSON_IOU_THRESHOLDS)
        for s, setup in enumerate(TINYPERSON_MR_SIZE_RANGES)
    }


def _metrics(arrays: coco_tiny.CocoArrays, category=None) -> dict[str, float]:
    metrics = {}
    for kind in ("ap", "ar"):
        for iou in TINYPERSON_IOU_THRESHOLDS:
            for area in TINYPERSON_AREA_RANGES:
                key = f"{kind.upper()}{round(iou * 100)}_{area}"
                metrics[key] = arrays.mean(kind, iou=iou, area=area, category=category)
    return metrics


def summary_lines(metrics: dict[str, float]) -> list[str]:
    """The TinyPerson papers' tables: AP and MR at IoU 0.5 per size range, then tiny at
    0.25/0.75."""
    areas = ("tiny1", "tiny2", "tiny3", "tiny", "small")
    lines = []
    for name, note in (
        ("AP", f"percent, maxDets = {TINYPERSON_MAX_DETS[0]}"),
        ("MR", "percent, log-average miss rate over FPPI 0.01-1"),
    ):
        lines += [
            " ".join(f"{name + '50_' + a:>12s}" for a in areas),
            " ".join(f"{100 * metrics[name + '50_' + a]:12.2f}" for a in areas),
            f"{name}25_tiny = {100 * metrics[name + '25_tiny']:.2f}  {name}75_tiny = "
            f"{100 * metrics[name + '75_tiny']:.2f}  ({note})",
        ]
    return lines


def evaluate_tinyperson(
    gt: dict, detections: results.DetectionArrays, backend: str = "faster_coco_eval"
) -> dict:
    """TinyPerson metrics, fractions (-1 without ground truth): 'AP{25,50,75}_{range}' and
    'AR{25,50,75}_{range}' for the AP ranges, 'MR{25,50,75}_{setup}' for the MR setups;
    'per_class', 'summary' lines and the number of ignore regions."""
    ignore_regions = mark_ignore_regions(gt)
    arrays = _run_ranges(gt, detections, backend)
    recall = _miss_rate_arrays(gt, detections.to_coco())
    metrics = {**_metrics(arrays), **_mr_metrics(recall)}
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    per_class = {
        names[cat_id]: {**_metrics(arrays, category=k), **_mr_metrics(recall, category=k)}
        for k, cat_id in enumerate(arrays.category_ids)
    }
    return {
        **metrics,
        "per_class": per_class,
        "summary": summary_lines(metrics),
        "ignore_regions": ignore_regions,
    }
