"""oLRP: the optimal Localisation-Recall-Precision error of one category and area range.

oLRP (Oksuz et al., "Localization Recall Precision (LRP): A New Performance Metric for Object
Detection", ECCV 2018) exactly as the official AI-TOD evaluator computes it. References are to
aitodpycocotools/aitodpycocotools/cocoeval.py at jwwangchn/cocoapi-aitod@44a230a:
  * evaluateImg (lines 250-335) keeps, per image and category, each detection's IoU with the
    ground truth it matched (dtIoUs, line 315); nothing else of the matching changes.
  * accumulate(with_lrp=True) (lines 458-491), per category k, area range a and maxDets m, from
    the detections of every image concatenated (each image's top maxDet) and stably sorted by
    score (lines 395-411), at the FIRST IoU threshold only (tps[0], fps[0], dtIoU[0]; tau =
    iouThrs[0] = 0.5): with cumulative counts N_TP, N_FP and N_FN = npig - N_TP after every
    rank (ignored detections count as neither TP nor FP), and loc = N_TP - sum of TP IoUs,
      LRP = (loc / (1 - tau) + N_FP + N_FN) / (N_TP + N_FP + N_FN),
    oLRP = min over ranks (np.argmin: the first minimum); at that rank oLRP_loc = loc / N_TP
    (the mean 1 - IoU of the TPs, NOT divided by 1 - tau), oLRP_FP = N_FP / (N_TP + N_FP),
    oLRP_FN = N_FN / npig and the threshold is that detection's score. No detection, or no TP
    among them: oLRP = oLRP_FN = 1 and loc, FP, threshold NaN. No ground truth (npig = 0, or
    no image with ground truth or detections): -1, the entry is skipped (lines 393-416).
  * summarize (lines 545-580, 617-636) reports area 'all' at maxDets[2] (1,500): the mean over
    categories after dropping NaN, of the entries > -1 (else -1). mmdet-aitod's class-wise
    oLRP is the same entry [k, 0, -1] (aitod.py lines 196-228).
Every scorer (coco_tiny's COCOeval backends, array_cocoeval) hands its own matching to ``olrp``,
so they share this accumulation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

OLRP_PARTS = ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "oLRP_thr")


def olrp(
    scores: np.ndarray, tps: np.ndarray, fps: np.ndarray, tp_iou: np.ndarray, npig: int, tau: float
) -> tuple[float, float, float, float, float]:
    """(oLRP, loc, FP, FN, threshold) of one category and area range.

    Args:
      scores: float [D], the detections of every image ranked as accumulate ranks them (each
        image's top maxDet, stably sorted by descending score over images in id order).
      tps, fps: bool [D], TP / FP at IoU tau (both False: ignored).
      tp_iou: float [D], each TP's IoU with its ground truth (anything where not a TP).
      npig: the number of non-ignored ground-truth boxes; tau: the IoU threshold.
    """
    if npig == 0:
        return (-1.0,) * 5
    if tps.size == 0 or not tps.any():  # no detection, or no TP among them
        return 1.0, np.nan, np.nan, 1.0, np.nan
    tp_num = np.cumsum(tps)
    fp_num = np.cumsum(fps)
    fn_num = npig - tp_num
    total_loc = tp_num - np.cumsum(tp_iou * tps)
    lrps = (total_loc / (1 - tau) + fp_num + fn_num) / (tp_num + fp_num + fn_num)
    best = int(np.argmin(lrps))
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> NaN, as the official code
        loc = total_loc[best] / tp_num[best]
        fp_part = fp_num[best] / (tp_num[best] + fp_num[best])
    return (
        float(lrps[best]),
        float(loc),
        float(fp_part),
        float(fn_num[best] / npig),
        float(scores[best]),
    )


def olrp_of_images(images: Iterable[tuple], max_det: int, tau: float) -> tuple[float, ...]:
    """``olrp`` of per-image evaluations (scores [D], tp [D], fp [D], tp_iou [D], npig), each
    ranked within its image and given in image-id order: each image's top ``max_det``, merged
    by a stable sort on descending score, as accumulate merges them."""
    images = list(images)
    npig = sum(image[4] for image in images)
    if npig == 0:
        return (-1.0,) * 5
    scores = np.concatenate([s[:max_det] for s, *_ in images])
    order = np.argsort(-scores, kind="mergesort")
    tps = np.concatenate([tp[:max_det] for _, tp, *_ in images])[order]
    fps = np.concatenate([fp[:max_det] for _, _, fp, *_ in images])[order]
    tp_iou = np.concatenate([iou[:max_det] for *_, iou, _ in images])[order]
    return olrp(scores[order], tps, fps, tp_iou, npig, tau)
