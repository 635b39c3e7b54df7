"""AI-TOD metrics on pycocotools' COCOeval, with a faster_coco_eval (C++) backend.

Both backends run the same parameters (IoU thresholds, area ranges on the ground-truth 'area'
field, max detections) and return the same accumulated arrays, precision [T, R, K, A, M] and
recall [T, K, A, M] (-1 where a category has no ground truth in an area range); the summary is
computed here from those arrays rather than by COCOeval.summarize, whose labels and maxDets
indices are hard-coded for COCO. An averaged metric is the mean of its entries > -1, or -1
when there are none (COCO's convention).

Area ranges are inclusive at both ends as in the official AI-TOD COCO API, so a box of
exactly 8x8 px counts as both very tiny and tiny.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np

from dfrdet_jax.evaluation import results

BACKENDS = ("faster_coco_eval", "pycocotools")

AITOD_AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "vt": (0.0, 8.0**2),
    "t": (8.0**2, 16.0**2),
    "s": (16.0**2, 32.0**2),
    "m": (32.0**2, 1e5**2),
}
AITOD_MAX_DETS = (1, 100, 1500)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_AREA_NAMES = {"all": "all", "vt": "verytiny", "t": "tiny", "s": "small", "m": "medium"}


@dataclasses.dataclass(frozen=True)
class CocoArrays:
    """Accumulated COCOeval output and the parameters it was computed with."""

    precision: np.ndarray  # [T, R, K, A, M]
    recall: np.ndarray  # [T, K, A, M]
    iou_thresholds: np.ndarray  # [T]
    category_ids: list[int]  # [K]
    area_labels: list[str]  # [A]
    max_dets: list[int]  # [M]

    def mean(self, kind: str, iou=None, area="all", max_det=None, category=None) -> float:
        """COCO mean of precision ('ap') or recall ('ar') entries > -1, else -1.

        iou: one threshold or None for all; max_det: None for the largest; category: index into
        category_ids or None for all.
        """
        t = slice(None)
        if iou is not None:
            (matches,) = np.nonzero(np.isclose(self.iou_thresholds, iou))
            if matches.size != 1:
                raise ValueError(f"IoU {iou} is not one of {self.iou_thresholds.tolist()}")
            t = int(matches[0])
        a = self.area_labels.index(area)
        m = self.max_dets.index(self.max_dets[-1] if max_det is None else max_det)
        k = slice(None) if category is None else category
        if kind == "ap":
            values = self.precision[t, :, k, a, m]
        else:
            values = self.recall[t, k, a, m]
        values = np.asarray(values)[np.asarray(values) > -1]
        return float(values.mean()) if values.size else -1.0


def _cocoeval_classes(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise ValueError(f"Unknown evaluation backend {backend!r}; choose one of {BACKENDS}")


def run_cocoeval(
    gt: dict,
    detections: list[dict],
    *,
    area_ranges: dict[str, tuple[float, float]],
    max_dets: tuple[int, ...],
    iou_thresholds: np.ndarray = COCO_IOU_THRESHOLDS,
    backend: str = "faster_coco_eval",
) -> CocoArrays:
    """COCOeval ('bbox') of validated ``detections`` against validated ``gt`` (results module).

    Ground-truth annotations with iscrowd=1 are ignore regions: COCOeval scores their overlap as
    intersection over detection area and ignores detections that reach the IoU threshold.
    """
    coco_cls, eval_cls = _cocoeval_classes(backend)
    coco_gt, coco_dt = results.build_coco_pair(coco_cls, gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = eval_cls(coco_gt, coco_dt, "bbox")
        if backend == "faster_coco_eval":
            evaluator.print_function = lambda *args, **kwargs: None
        params = evaluator.params
        params.imgIds = sorted(img["id"] for img in gt["images"])
        params.catIds = sorted(cat["id"] for cat in gt["categories"])
        params.iouThrs = np.asarray(iou_thresholds, np.float64)
        params.areaRng = [list(r) for r in area_ranges.values()]
        params.areaRngLbl = list(area_ranges)
        params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return CocoArrays(
        precision=np.asarray(evaluator.eval["precision"], np.float64),
        recall=np.asarray(evaluator.eval["recall"], np.float64),
        iou_thresholds=np.asarray(iou_thresholds, np.float64),
        category_ids=list(params.catIds),
        area_labels=list(area_ranges),
        max_dets=list(max_dets),
    )


def _aitod_metrics(arrays: CocoArrays, category=None) -> dict[str, float]:
    """The AI-TOD metric set (headline numbers at the largest maxDets)."""
    metrics = {
        "AP": arrays.mean("ap", category=category),
        "AP50": arrays.mean("ap", iou=0.5, category=category),
        "AP75": arrays.mean("ap", iou=0.75, category=category),
    }
    for area in ("vt", "t", "s", "m"):
        metrics[f"AP_{area}"] = arrays.mean("ap", area=area, category=category)
    for max_det in arrays.max_dets:
        metrics[f"AR@{max_det}"] = arrays.mean("ar", max_det=max_det, category=category)
    for area in ("vt", "t", "s", "m"):
        metrics[f"AR_{area}"] = arrays.mean("ar", area=area, category=category)
    return metrics


def summary_lines(arrays: CocoArrays) -> list[str]:
    """The familiar COCOeval.summarize lines for the AI-TOD parameters."""
    last = arrays.max_dets[-1]
    rows = [("ap", None, "all", last), ("ap", 0.5, "all", last), ("ap", 0.75, "all", last)]
    rows += [("ap", None, area, last) for area in ("vt", "t", "s", "m")]
    rows += [("ar", None, "all", m) for m in arrays.max_dets]
    rows += [("ar", None, area, last) for area in ("vt", "t", "s", "m")]
    lines = []
    for kind, iou, area, max_det in rows:
        title = "Average Precision  (AP)" if kind == "ap" else "Average Recall     (AR)"
        t = arrays.iou_thresholds
        iou_text = f"{t[0]:0.2f}:{t[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        value = arrays.mean(kind, iou=iou, area=area, max_det=max_det)
        lines.append(
            f" {title} @[ IoU={iou_text:<9} | area={_AREA_NAMES[area]:>8s} | "
            f"maxDets={max_det:>4d} ] = {value:0.3f}"
        )
    return lines


def evaluate_aitod(gt: dict, detections: list[dict], backend: str = "faster_coco_eval") -> dict:
    """AI-TOD metrics: flat headline floats, 'per_class' {name: metrics} and 'summary' lines."""
    arrays = run_cocoeval(
        gt,
        detections,
        area_ranges=AITOD_AREA_RANGES,
        max_dets=AITOD_MAX_DETS,
        backend=backend,
    )
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    per_class = {
        names[cat_id]: _aitod_metrics(arrays, category=k)
        for k, cat_id in enumerate(arrays.category_ids)
    }
    return {**_aitod_metrics(arrays), "per_class": per_class, "summary": summary_lines(arrays)}
