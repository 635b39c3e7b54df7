"""AI-TOD metrics of COCOeval's matching: on arrays (array_cocoeval.py) or on the COCO API.

Three backends run the same parameters (IoU thresholds, area ranges on the ground-truth 'area'
field, max detections) and return the same accumulated arrays (tested to 1e-12):

  * 'numpy' (DEFAULT_BACKEND): array_cocoeval, COCOeval's evaluateImg and accumulate
    vectorised over arrays. The default because it is exact and the fastest and leanest: no
    Python dict per detection, about 45 bytes kept per detection (benchmarks/eval_speed.py,
    2,000 images x 1,500 detections on 2 shared cores: 4.8 s and 0.75 GB peak against
    faster_coco_eval's 51.2 s and 7.1 GB).
  * 'faster_coco_eval' (its C++ COCOeval) and 'pycocotools' (the reference COCOeval), on COCO
    result dicts; the references the numpy backend is tested against.

The arrays are precision [T, R, K, A, M] and recall [T, K, A, M] (-1 where a category has no
ground truth in an area range); the summary is computed here from those arrays rather than by
COCOeval.summarize, whose labels and maxDets indices are hard-coded for COCO. An averaged
metric is the mean of its entries > -1, or -1 when there are none (COCO's convention).

Area ranges are inclusive at both ends as in the official AI-TOD COCO API, so a box of
exactly 8x8 px counts as both very tiny and tiny.

Beyond COCO's AP/AR, AI-TOD's official evaluator (the aitodpycocotools fork,
github.com/jwwangchn/cocoapi-aitod @ 44a230a, aitodpycocotools/aitodpycocotools/cocoeval.py) also
reports the optimal Localisation-Recall-Precision error (oLRP, Oksuz et al., ECCV 2018) and its
localisation, FP and FN parts, and mmdet-aitod (github.com/Chasel-Tsui/mmdet-aitod @ e3e5671,
mmdet-nwdrka/mmdet/datasets/aitod.py) reports AR at 100, 300 and 1,500 detections. Both are
here: ``lrp_areas`` of ``run_cocoeval`` and the AR@300 of ``AITOD_MAX_DETS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io

import numpy as np

from dfrdet_jax.choices import unknown_choice
from dfrdet_jax.evaluation import array_cocoeval, lrp, results

BACKENDS = ("numpy", "faster_coco_eval", "pycocotools")
DEFAULT_BACKEND = "numpy"

AITOD_AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "vt": (0.0, 8.0**2),
    "t": (8.0**2, 16.0**2),
    "s": (16.0**2, 32.0**2),
    "m": (32.0**2, 1e5**2),
}
# COCOeval's maxDets. The official AI-TOD Params use (1, 100, 1500) (cocoeval.py line 688);
# mmdet-aitod sets (100, 300, 1500) and reports AR@100/300/1500 (aitod.py lines 29, 112, 124-126).
# The union: each maxDets value is scored independently of the others (matching always keeps the
# largest, 1,500), so adding 300 leaves every other number unchanged.
AITOD_MAX_DETS = (1, 100, 300, 1500)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_AREA_NAMES = {"all": "all", "vt": "verytiny", "t": "tiny", "s": "small", "m": "medium"}
# oLRP and its parts as the official summary reports them (cocoeval.py lines 617-636: stats
# 15-18, each at IoU 0.5, area 'all' and the largest maxDets), with mmdet-aitod's row titles;
# 'oLRP_thr' (the class-wise LRP-optimal score thresholds, printed by lines 637-641) stays in
# CocoArrays.lrp.
LRP_KEYS = {
    "oLRP": "Optimal LRP",
    "oLRP_loc": "Optimal LRP Loc",
    "oLRP_FP": "Optimal LRP FP",
    "oLRP_FN": "Optimal LRP FN",
}


@dataclasses.dataclass(frozen=True)
class CocoArrays:
    """Accumulated COCOeval output and the parameters it was computed with."""

    precision: np.ndarray  # [T, R, K, A, M]
    recall: np.ndarray  # [T, K, A, M]
    iou_thresholds: np.ndarray  # [T]
    category_ids: list[int]  # [K]
    area_labels: list[str]  # [A]
    max_dets: list[int]  # [M]
    # {'oLRP', 'oLRP_loc', 'oLRP_FP', 'oLRP_FN', 'oLRP_thr'}: [K, A] at the largest maxDets and
    # the first IoU threshold, as the official eval['olrp'...][:, :, -1]: -1 where the category
    # has no ground truth in the area range (or the area was not in lrp_areas), NaN where the
    # official code leaves the part undefined (loc, FP and threshold when no detection is a TP).
    lrp: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

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

    def lrp_mean(self, name: str, area="all", category=None) -> float:
        """Official mean of an oLRP part over categories: NaN entries dropped, then the mean of
        entries > -1, else -1 (cocoeval.py lines 571-576)."""
        values = np.asarray(self.lrp[name][:, self.area_labels.index(area)])
        if category is not None:
            values = values[category : category + 1]
        values = values[~np.isnan(values)]
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0


def _cocoeval_classes(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise unknown_choice("evaluation backend", backend, BACKENDS)


def run_cocoeval(
    gt: dict,
    detections: results.DetectionArrays,
    *,
    area_ranges: dict[str, tuple[float, float]],
    max_dets: tuple[int, ...],
    iou_thresholds: np.ndarray = COCO_IOU_THRESHOLDS,
    backend: str = DEFAULT_BACKEND,
    lrp_areas: tuple[str, ...] = (),
) -> CocoArrays:
    """COCOeval ('bbox') of validated ``detections`` against validated ``gt`` (results module).

    Ground-truth annotations with iscrowd=1 are ignore regions: COCOeval scores their overlap as
    intersection over detection area and ignores detections that reach the IoU threshold.
    ``lrp_areas``: area labels whose oLRP arrays (CocoArrays.lrp) to compute from the same
    per-image matching; none by default.
    """
    arrays = functools.partial(
        CocoArrays,
        iou_thresholds=np.asarray(iou_thresholds, np.float64),
        category_ids=sorted(cat["id"] for cat in gt["categories"]),
        area_labels=list(area_ranges),
        max_dets=list(max_dets),
    )
    if backend == "numpy":
        precision, recall, lrp_parts = array_cocoeval.evaluate(
            gt,
            detections,
            area_ranges=area_ranges,
            max_dets=max_dets,
            iou_thresholds=iou_thresholds,
            lrp_areas=lrp_areas,
        )
        return arrays(precision=precision, recall=recall, lrp=lrp_parts)
    coco_cls, eval_cls = _cocoeval_classes(backend)
    coco_gt, coco_dt = results.build_coco_pair(coco_cls, gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = eval_cls(coco_gt, coco_dt, "bbox")
        if backend == "faster_coco_eval":
            evaluator.print_function = lambda *args, **kwargs: None
            # Keep the per-image evaluations (the same C++ EvaluateImages then Accumulate as the
            # one-call path, so the same arrays) for oLRP to read.
            evaluator.separate_eval = bool(lrp_areas)
        params = evaluator.params
        params.imgIds = sorted(img["id"] for img in gt["images"])
        params.catIds = sorted(cat["id"] for cat in gt["categories"])
        params.iouThrs = np.asarray(iou_thresholds, np.float64)
        params.areaRng = [list(r) for r in area_ranges.values()]
        params.areaRngLbl = list(area_ranges)
        params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return arrays(
        precision=np.asarray(evaluator.eval["precision"], np.float64),
        recall=np.asarray(evaluator.eval["recall"], np.float64),
        lrp=_lrp_arrays(evaluator, backend, list(area_ranges), lrp_areas) if lrp_areas else {},
    )


# oLRP (lrp.py): both COCOeval backends supply the per-image matching their own COCOeval already
# made (nothing is re-matched here) to the shared accumulation of lrp.olrp_of_images.


def _pycocotools_images(evaluator, k: int, a: int):
    """(scores, tp, fp, tp_iou, npig) per image from pycocotools' evalImgs [K, A, I] and ious."""
    p = evaluator.params
    cat_id, num_images = p.catIds[k], len(p.imgIds)
    base = (k * len(p.areaRng) + a) * num_images
    for i, img_id in enumerate(p.imgIds):
        e = evaluator.evalImgs[base + i]
        if e is None:  # no ground truth and no detection of this category in the image
            continue
        matches = np.asarray(e["dtMatches"], np.float64).reshape(len(p.iouThrs), -1)[0]
        ignored = np.asarray(e["dtIgnore"], bool).reshape(len(p.iouThrs), -1)[0]
        tp = (matches != 0) & ~ignored
        tp_iou = np.zeros(matches.shape)
        if tp.any():  # IoU of each TP with its ground truth: computeIoU's [detection, gt] matrix
            column = {g["id"]: j for j, g in enumerate(evaluator._gts[img_id, cat_id])}
            ious = evaluator.ious[img_id, cat_id]
            for d in np.flatnonzero(tp):
                tp_iou[d] = ious[d, column[int(matches[d])]]
        npig = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        yield np.asarray(e["dtScores"], np.float64), tp, (matches == 0) & ~ignored, tp_iou, npig


def _faster_coco_eval_images(evaluator, k: int, a: int):
    """The same from faster_coco_eval's per-image C++ evaluations (separate_eval=True).

    Each ImageEvaluation pickles (faster_eval_api.cpp) to (detection_matches [T*D] gt ids,
    ground_truth_matches, detection_scores [D], ground_truth_ignores [G], detection_ignores
    [T*D], matched_annotations [(dt_id, gt_id, iou)] appended threshold by threshold, detection
    by detection (cocoeval.cpp MatchDetectionsToGroundTruth)), so the first matches listed are
    those at the first IoU threshold, in detection order.
    """
    p = evaluator.params
    num_images = len(p.imgIds)
    base = (k * len(p.areaRng) + a) * num_images
    for i in range(num_images):
        state = evaluator._evalImgs_cpp[base + i].__getstate__()
        dt_matches, _, scores, gt_ignores, dt_ignores, matched = state
        num_dets = len(scores)
        matches = np.asarray(dt_matches[:num_dets], np.float64)
        ignored = np.asarray(dt_ignores[:num_dets], bool)
        tp = (matches != 0) & ~ignored
        tp_iou = np.zeros(num_dets)
        if tp.any():
            first = np.flatnonzero(matches != 0)
            pairs = matched[: first.size]
            if [gt_id for _, gt_id, _ in pairs] != matches[first].astype(np.int64).tolist():
                raise RuntimeError(
                    "faster_coco_eval's per-image evaluation layout is not the one oLRP expects "
                    "(score with backend='pycocotools')"
                )
            tp_iou[first] = [iou for _, _, iou in pairs]
            tp_iou[~tp] = 0.0
        npig = int(np.count_nonzero(~np.asarray(gt_ignores, bool)))
        yield np.asarray(scores, np.float64), tp, (matches == 0) & ~ignored, tp_iou, npig


def _lrp_arrays(evaluator, backend: str, area_labels: list[str], lrp_areas) -> dict:
    """CocoArrays.lrp: the official oLRP arrays [K, A] at the largest maxDets."""
    p = evaluator.params
    images_of = _pycocotools_images if backend == "pycocotools" else _faster_coco_eval_images
    parts = np.full((5, len(p.catIds), len(area_labels)), -1.0)
    for area in lrp_areas:
        a = area_labels.index(area)
        for k in range(len(p.catIds)):
            images = images_of(evaluator, k, a)
            parts[:, k, a] = lrp.olrp_of_images(images, p.maxDets[-1], p.iouThrs[0])
    return dict(zip(lrp.OLRP_PARTS, parts))


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
    if arrays.lrp:
        for key in LRP_KEYS:
            metrics[key] = arrays.lrp_mean(key, category=category)
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
    if arrays.lrp:
        iou_text = f"{arrays.iou_thresholds[0]:0.2f}"
        for key, title in LRP_KEYS.items():
            lines.append(
                f" {title:<23s} @[ IoU={iou_text:<9} | area={_AREA_NAMES['all']:>8s} | "
                f"maxDets={last:>4d} ] = {arrays.lrp_mean(key):0.3f}"
            )
    return lines


def precision_recall_curves(
    gt: dict, detections: results.DetectionArrays, iou: float = 0.5, backend=DEFAULT_BACKEND
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(recall float [101], {AI-TOD area label: precision [101]}) at IoU ``iou`` and 1,500
    detections: COCOeval's interpolated precision at each recall, the mean over the categories
    with ground truth in the area (-1 where none has). ``gt`` and ``detections`` as validated
    by the results module."""
    arrays = run_cocoeval(
        gt,
        detections,
        area_ranges=AITOD_AREA_RANGES,
        max_dets=AITOD_MAX_DETS,
        iou_thresholds=np.array([iou]),
        backend=backend,
    )
    curves = {}
    for a, label in enumerate(arrays.area_labels):
        precision = arrays.precision[0, :, :, a, -1]  # [R, K]
        has_gt = (precision > -1).any(axis=0)
        curves[label] = precision[:, has_gt].mean(axis=1) if has_gt.any() else np.full(101, -1.0)
    return np.linspace(0.0, 1.0, arrays.precision.shape[1]), curves


def evaluate_aitod(
    gt: dict, detections: results.DetectionArrays, backend: str = DEFAULT_BACKEND
) -> dict:
    """AI-TOD metrics: flat headline floats, 'per_class' {name: metrics} and 'summary' lines.

    Headline keys: AP, AP50, AP75, AP_vt/t/s/m and AR_vt/t/s/m (at 1,500 detections), AR@1,
    AR@100, AR@300, AR@1500, and oLRP, oLRP_loc, oLRP_FP, oLRP_FN (area 'all', IoU 0.5, 1,500
    detections; lower is better; -1 where undefined: a category with no ground truth, or, for
    loc and FP, with no TP).
    """
    arrays = run_cocoeval(
        gt,
        detections,
        area_ranges=AITOD_AREA_RANGES,
        max_dets=AITOD_MAX_DETS,
        backend=backend,
        lrp_areas=("all",),
    )
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    per_class = {
        names[cat_id]: _aitod_metrics(arrays, category=k)
        for k, cat_id in enumerate(arrays.category_ids)
    }
    return {**_aitod_metrics(arrays), "per_class": per_class, "summary": summary_lines(arrays)}
