"""TinyPerson ignore regions, size ranges and miss rate; DOTA tile merging, NMS, VOC AP50 and
the AI-TOD metrics after merging."""

import math

import numpy as np
import pytest
from test_evaluation_aitod import det, make_gt

from dfrdet_jax import evaluation
from dfrdet_jax.evaluation import coco_tiny, dota, tinyperson


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


@pytest.mark.parametrize("backend", coco_tiny.BACKENDS)
def test_detection_on_a_person_outside_the_range_is_ignored_by_iod(backend):
    # A tiny person (10 px) and a small one (25 px); the top detection lies 6 x 10 px inside the
    # small person: IoU 60 / 665 = 0.09, IoD 0.6. In 'tiny' the small person is ignored, so the
    # detection is ignored at IoU thresholds 0.25 and 0.5 and a FP above the TP at 0.75 (AP 0.5).
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (1, [50, 50, 25, 25])]})
    dets = [det(1, [69, 55, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.5)]
    m = evaluation.evaluate(gt, dets, protocol="tinyperson", backend=backend)
    assert m["AP25_tiny"] == pytest.approx(1.0)
    assert m["AP50_tiny"] == pytest.approx(1.0)
    assert m["AP50_tiny2"] == pytest.approx(1.0)
    assert m["AP75_tiny"] == pytest.approx(0.5)
    # In 'all' both persons count: FP, TP and a miss; precision 1/2 up to recall 1/2, i.e. at 51
    # of the 101 recall points.
    for iou in (25, 50, 75):
        assert m[f"AP{iou}_all"] == pytest.approx(0.5 * 51 / 101)
        assert m[f"AR{iou}_all"] == pytest.approx(0.5)
        assert m[f"AR{iou}_tiny"] == pytest.approx(1.0)
    # In 'small' the top detection is outside the range (ignored), the other on an ignored
    # person: nothing scores and the small person is missed.
    assert m["AP50_small"] == 0.0 and m["AR50_small"] == 0.0


def test_miss_rate_by_hand():
    # 8 images; image 1: four tiny persons (10 px), a 40 x 40 ignore region, a small person
    # (25 px). Detections, best first: a TP; one inside the region (IoD 1); one 30% inside it
    # (IoD 0.3, ignored by the official fallback 0.3 / 1.3 x (1 + 1600 / 100) = 3.9 > 0.5); one
    # inside the small person; a 40 px box (beyond tiny's 20 x 1.25 size filter); a FP in image
    # 2; a TP.
    persons = [(1, [20 * i, 0, 10, 10]) for i in range(4)] + [(1, [200, 200, 25, 25])]
    gt = make_gt({1: persons, **{i: [] for i in range(2, 9)}})
    gt["annotations"].append(
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "ignore": 1}
    )
    dets = [
        det(1, [0, 0, 10, 10], 0.95),
        det(1, [110, 110, 10, 10], 0.9),
        det(1, [137, 110, 10, 10], 0.85),
        det(1, [205, 205, 10, 10], 0.8),
        det(1, [300, 300, 40, 40], 0.75),
        det(2, [0, 0, 10, 10], 0.7),
        det(1, [20, 0, 10, 10], 0.6),
    ]
    m = evaluation.evaluate(gt, dets, protocol="tinyperson")
    np.testing.assert_allclose(tinyperson.MR_FPPI, np.logspace(-2, 0, 9))
    # tiny: the detections in the region, 30% in it and in the small person are ignored, the
    # 40 px one dropped: TP, FP (FPPI 1/8), TP on 4 persons: recall 1/4 at the five FPPI points
    # below 1/8 (0.01 ... 0.1), 1/2 at the four from 0.178 on.
    tiny = math.exp((5 * math.log(0.75) + 4 * math.log(0.5)) / 9)
    for iou in (25, 50, 75):
        assert m[f"MR{iou}_tiny"] == pytest.approx(tiny)
    assert m["MR50_tiny2"] == pytest.approx(tiny)
    # all: the small person counts, so the detection inside it is a FP, as are the 40 px box and
    # image 2's: TP, FP, FP, FP, TP on 5 persons at FPPI 1/8, 2/8, 3/8: recall 1/5 up to 0.316,
    # 2/5 at 0.562 and 1.
    assert m["MR50_all"] == pytest.approx(math.exp((7 * math.log(0.8) + 2 * math.log(0.6)) / 9))
    assert m["MR50_small"] == 1.0  # no detection within small's [16, 40) px filter: a miss
    assert m["MR50_tiny1"] == -1.0  # no person of 2-8 px
    assert "MR50_tiny3" in "\n".join(m["summary"])


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


@pytest.mark.parametrize("backend", coco_tiny.BACKENDS)
def test_dota_aitod_scores_merged_tiles_as_the_full_image(backend):
    # A 224 x 128 image cut into tiles x 0-128 and x 96-224: objects of every AI-TOD size in two
    # classes, one in the overlap (found by both tiles, the second also as a copy shifted by
    # 1 px and scored lower), one missed and flagged difficult (counted, as in COCO-format
    # DOTA), two false positives.
    gt = make_gt(
        {
            1: [
                (1, [10, 10, 6, 6]),
                (1, [100, 40, 12, 12]),
                (2, [150, 60, 20, 20]),
                (2, [20, 70, 40, 40]),
                (1, [180, 10, 10, 10]),
            ]
        },
        categories=(1, 2),
    )
    gt["annotations"][4]["ignore"] = 1
    full = [  # (x1, y1, x2, y2, score, class index) in full-image px
        (10.5, 10, 16.5, 16, 0.4, 0),
        (100, 41, 112, 53, 0.8, 0),
        (60, 100, 68, 108, 0.85, 0),
        (22, 72, 60, 110, 0.6, 1),
        (151, 60, 171, 80, 0.7, 1),
        (200, 100, 216, 116, 0.3, 1),
    ]
    tiles = [[row for row in full if row[2] <= 128], [row for row in full if row[0] >= 96]]
    tiles[1].append((101, 41, 113, 53, 0.5, 0))  # IoU 0.85 with the box in the overlap
    k = max(len(t) for t in tiles)
    boxes, scores = np.zeros((2, k, 4)), np.zeros((2, k))
    classes, valid = np.zeros((2, k), int), np.zeros((2, k), bool)
    offsets = np.array([[0, 0], [96, 0]])
    for b, rows in enumerate(tiles):
        for j, (x1, y1, x2, y2, score, label) in enumerate(rows):
            boxes[b, j] = [x1 - offsets[b, 0], y1, x2 - offsets[b, 0], y2]
            scores[b, j], classes[b, j], valid[b, j] = score, label, True
    tile_dets = evaluation.detections_to_coco(
        boxes, scores, classes, valid, np.array([1, 1]), np.ones(2), [1, 2], offsets
    )
    full_dets = [det(1, [x1, y1, x2 - x1, y2 - y1], s, c + 1) for x1, y1, x2, y2, s, c in full]
    merged = evaluation.evaluate(gt, tile_dets, protocol="dota_aitod", backend=backend)
    direct = evaluation.evaluate(gt, full_dets, protocol="aitod", backend=backend)
    assert (merged["num_detections"], merged["merged_detections"]) == (8, 6)
    for key, value in direct.items():
        if isinstance(value, float):
            assert merged[key] == pytest.approx(value), key
    for name, values in direct["per_class"].items():
        assert merged["per_class"][name] == pytest.approx(values), name
    assert 0 < direct["AP"] < 1
    # The difficult box counts as a tiny object, missed: without it tiny recall is higher.
    easy = {**gt, "annotations": gt["annotations"][:4]}
    assert merged["AR_t"] < evaluation.evaluate(easy, full_dets, backend=backend)["AR_t"]
    # Unmerged, the duplicates are false positives ranked above the 0.4 true positive.
    assert evaluation.evaluate(gt, tile_dets, backend=backend)["AP"] < direct["AP"]
