"""TinyPerson protocol on COCOeval (both backends of coco_tiny).

What is implemented, following the official TinyBenchmark / TOV_mmdetection evaluation code
(``evaluate_standard='tiny'`` with ``use_ignore_attr``, ``ignore_uncertain`` and
``use_iod_for_ignore`` with ``iod_th_of_iou_f = lambda iou: iou``):
  * IoU thresholds 0.25, 0.5, 0.75; max detections 200 per image.
  * size ranges on sqrt(GT area) in px, inclusive at both ends:
    all [1, 1e5], tiny [1, 20], tiny1 [1, 8], tiny2 [8, 12], tiny3 [12, 20], small [20, 32],
    reasonable [32, 1e5]. (The paper writes the lower bound as 2; the official code uses 1.)
  * ignore regions: annotations with a truthy 'ignore' or 'uncertain' field (or iscrowd=1) are
    not ground truth. A detection is scored against them by intersection over the detection's
    area (IoD) and, when IoD >= the IoU threshold being evaluated, it is neither TP nor FP.
    This is exactly COCOeval's crowd-region rule, so ignore regions are passed as iscrowd=1.
  * miss rate (MR) is not reported.
"""

from __future__ import annotations

import numpy as np

from dfrdet_jax.evaluation import coco_tiny

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


def mark_ignore_regions(gt: dict) -> int:
    """Sets iscrowd=1 on ignore/uncertain annotations of ``gt`` (in place); returns their count."""
    count = 0
    for ann in gt["annotations"]:
        if ann.get("ignore") or ann.get("uncertain") or ann.get("iscrowd"):
            ann["iscrowd"] = 1
            count += 1
    return count


def _metrics(arrays: coco_tiny.CocoArrays, category=None) -> dict[str, float]:
    metrics = {}
    for iou in TINYPERSON_IOU_THRESHOLDS:
        for area in TINYPERSON_AREA_RANGES:
            key = f"AP{round(iou * 100)}_{area}"
            metrics[key] = arrays.mean("ap", iou=iou, area=area, category=category)
    for area in TINYPERSON_AREA_RANGES:
        metrics[f"AR50_{area}"] = arrays.mean("ar", iou=0.5, area=area, category=category)
    return metrics


def summary_lines(metrics: dict[str, float]) -> list[str]:
    """The TinyPerson papers' table: AP at IoU 0.5 per size range, then tiny at 0.25/0.75."""
    areas = ("tiny1", "tiny2", "tiny3", "tiny", "small")
    other_ious = (
        f"AP25_tiny = {100 * metrics['AP25_tiny']:.2f}  AP75_tiny = "
        f"{100 * metrics['AP75_tiny']:.2f}  (percent, maxDets = {TINYPERSON_MAX_DETS[0]})"
    )
    return [
        " ".join(f"{'AP50_' + a:>12s}" for a in areas),
        " ".join(f"{100 * metrics['AP50_' + a]:12.2f}" for a in areas),
        other_ious,
    ]


def evaluate_tinyperson(
    gt: dict, detections: list[dict], backend: str = "faster_coco_eval"
) -> dict:
    """TinyPerson metrics: 'AP{25,50,75}_{range}' and 'AR50_{range}' floats (fractions),
    'per_class', 'summary' lines and the number of ignore regions."""
    ignore_regions = mark_ignore_regions(gt)
    arrays = coco_tiny.run_cocoeval(
        gt,
        detections,
        area_ranges=TINYPERSON_AREA_RANGES,
        max_dets=TINYPERSON_MAX_DETS,
        iou_thresholds=TINYPERSON_IOU_THRESHOLDS,
        backend=backend,
    )
    metrics = _metrics(arrays)
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    per_class = {
        names[cat_id]: _metrics(arrays, category=k) for k, cat_id in enumerate(arrays.category_ids)
    }
    return {
        **metrics,
        "per_class": per_class,
        "summary": summary_lines(metrics),
        "ignore_regions": ignore_regions,
    }
