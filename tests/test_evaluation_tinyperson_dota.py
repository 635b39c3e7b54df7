"""TinyPerson ignore regions and size ranges; DOTA tile merging, NMS and VOC AP50."""

import numpy as np
import pytest
from test_evaluation_aitod import det, make_gt

from dfrdet_jax import evaluation
from dfrdet_jax.evaluation import coco_tiny, dota


def tinyperson_gt(with_ignore=True):
    gt = make_gt({1: [(1, [0, 0, 10, 10])]})  # sqrt(area) = 10 px: tiny and tiny2
    if with_ignore:
        gt["annotations"].append(
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "ignore": 1}
        )
    return gt


@pytest.mark.parametrize("backend", coco_tiny.BACKENDS)
def test_detection_inside_ignore_region_is_neither_tp_nor_fp(backend):
    dets = [det(1, [55, 55, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.5)]
    ignored = evaluation.evaluate(tinyperson_gt(), dets, protocol="tinyperson", backend=backend)
    assert ignored["ignore_regions"] == 1
    for iou in (25, 50, 75):
        assert ignored[f"AP{iou}_tiny"] == pytest.approx(1.0)
    assert ignored["AP50_tiny2"] == pytest.approx(1.0)
    assert ignored["AP50_tiny1"] == -1.0 and ignored["AP50_small"] == -1.0
    # Without the region the same detection is a false positive above the true positive.
    plain = evaluation.evaluate(
        tinyperson_gt(with_ignore=False), dets, protocol="tinyperson", backend=backend
    )
    assert plain["AP50_tiny"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", coco_tiny.BACKENDS)
def test_ignore_uses_intersection_over_detection_at_the_iou_threshold(backend):
    # 10x10 detection with a 4x10 strip inside the region: IoD = 0.4, so it is ignored at
    # IoU threshold 0.25 and a false positive at 0.5 and 0.75.
    dets = [det(1, [44, 60, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.5)]
    m = evaluation.evaluate(tinyperson_gt(), dets, protocol="tinyperson", backend=backend)
    assert m["AP25_tiny"] == pytest.approx(1.0)
    assert m["AP50_tiny"] == pytest.approx(0.5)
    assert m["AP75_tiny"] == pytest.approx(0.5)
    assert "AP50_tiny3" in evaluation.format_table(m)


def test_uncertain_annotations_are_ignore_regions():
    gt = tinyperson_gt(with_ignore=False)
    gt["annotations"].append(
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "uncertain": True}
    )
    dets = [det(1, [55, 55, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.5)]
    assert evaluation.evaluate(gt, dets, protocol="tinyperson")["AP50_tiny"] == pytest.approx(1.0)
    assert "iscrowd" not in gt["annotations"][1]  # the caller's ground truth is not modified


def test_nms_suppresses_overlaps_above_threshold_only():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 5], [20, 20, 30, 30]], float)
    scores = np.array([0.5, 0.9, 0.8, 0.1])
    # IoU(b1, b0) = 90/110 > 0.3: suppressed; IoU(b2, b1) = 45/105 > 0.3: suppressed.
    np.testing.assert_array_equal(dota.nms(boxes, scores, 0.3), [1, 3])
    np.testing.assert_array_equal(dota.nms(boxes, scores, 0.95), [1, 2, 0, 3])


def _np_iou(box, others):
    """IoU of box [4] with others [M, 4], float64 reference."""
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return inter / (np.prod(box[2:] - box[:2]) + areas - inter)


def test_nms_in_blocks_equals_plain_greedy_nms(monkeypatch):
    # More boxes than one block: kept boxes of earlier blocks suppress boxes of later ones.
    monkeypatch.setattr(dota, "_BLOCK", 8)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 12, (50, 2))], axis=1)
    scores = rng.random(50).round(1)  # ties: the lower index ranks first
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if not kept or _np_iou(boxes[i], boxes[kept]).max() <= 0.3:
            kept.append(i)
    assert 8 < len(kept) < 42  # several blocks kept boxes, and some lost to earlier blocks
    np.testing.assert_array_equal(dota.nms(boxes, scores, 0.3), kept)


def test_tile_predictions_are_shifted_back_and_merged():
    # The same object (full-image box x 100..110, y 40..50) seen by two overlapping tiles at
    # offsets (0, 0) and (96, 0), both with scale 1, plus a second class at the same place.
    boxes = np.array([[[100, 40, 110, 50], [100, 40, 110, 50]], [[4, 40, 14, 50], [0, 0, 0, 0]]])
    out = evaluation.detections_to_coco(
        boxes,
        scores=np.array([[0.9, 0.7], [0.8, 0.0]]),
        classes=np.array([[0, 1], [0, 0]]),
        valid=np.array([[True, True], [True, False]]),
        image_ids=np.array([5, 5]),
        scales=np.ones(2),
        category_ids=[1, 2],
        tile_offsets=np.array([[0, 0], [96, 0]]),
    )
    assert [d["bbox"] for d in out] == [[100, 40, 10, 10]] * 3
    merged = dota.merge_tile_detections(out)
    assert sorted((d["category_id"], d["score"]) for d in merged) == [(1, 0.9), (2, 0.7)]


def test_voc_ap50_by_hand_with_difficult_and_duplicate():
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10]), (1, [80, 80, 10, 10])]})
    gt["annotations"][2]["difficult"] = 1
    dets = [
        det(1, [0, 0, 10, 10], 0.95),  # TP
        det(1, [81, 80, 10, 10], 0.9),  # matches the difficult box: ignored
        det(1, [0, 1, 10, 10], 0.85),  # duplicate of the first: FP
        det(1, [50, 50, 10, 10], 0.8),  # TP
    ]
    m = evaluation.evaluate(gt, dets, protocol="dota")
    # Ranks TP, FP, TP on 2 positives: recall (.5, .5, 1), precision (1, .5, 2/3);
    # all-point AP = 0.5 * 1 + 0.5 * 2/3. The duplicate is 0.9 IoU from the first TP and is
    # removed by the tile merge (NMS), so score with merging disabled.
    assert dota.evaluate_dota(gt, dets, merge_iou=None)["mAP50"] == pytest.approx(0.5 + 1 / 3)
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["merged_detections"] == 3


def test_voc_ap_matches_direct_sum():
    recall = np.array([0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 1.0, 2 / 3, 0.75])
    assert dota.voc_ap(recall, precision) == pytest.approx(0.5 * 1.0 + 0.25 * 0.75)
