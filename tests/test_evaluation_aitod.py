"""AI-TOD metrics: hand-worked AP/AR values, area ranges, maxDets, and backend equality."""

import numpy as np
import pytest

from dfrdet_jax import evaluation
from dfrdet_jax.evaluation import coco_tiny, results

BACKENDS = coco_tiny.BACKENDS


def make_gt(boxes_per_image, categories=(1,)):
    """COCO gt from {image_id: [(category_id, [x, y, w, h]), ...]}."""
    images = [{"id": i, "width": 128, "height": 128} for i in boxes_per_image]
    anns = []
    for image_id, boxes in boxes_per_image.items():
        for category_id, bbox in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": list(bbox),
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c, "name": f"class{c}"} for c in categories]
    return {"images": images, "annotations": anns, "categories": cats}


def det(image_id, bbox, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_score_one(backend):
    gt = make_gt(
        {1: [(1, [10, 10, 20, 20]), (2, [40, 40, 5, 6])], 2: [(1, [0, 0, 12, 9])]},
        categories=(1, 2),
    )
    dets = [det(a["image_id"], a["bbox"], 0.9, a["category_id"]) for a in gt["annotations"]]
    m = evaluation.evaluate(gt, dets, backend=backend)
    for key in ("AP", "AP50", "AP75", "AR@100", "AR@1500"):
        assert m[key] == pytest.approx(1.0)
    assert m["per_class"]["class2"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_above_true_positive(backend):
    # Precision at ranks (FP, TP) = (0, 1/2) with recall (0, 1): the interpolated precision is
    # 1/2 at all 101 recall points, so AP = 0.5 at every IoU threshold.
    gt = make_gt({1: [(1, [10, 10, 20, 20])]})
    dets = [det(1, [80, 80, 20, 20], 0.9), det(1, [10, 10, 20, 20], 0.8)]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["AP"] == pytest.approx(0.5)
    assert m["AR@1"] == pytest.approx(0.0)  # the single top detection is the FP
    assert m["AR@100"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interpolated_precision_by_hand(backend):
    # Ranks TP, FP, TP on 2 GT: recall (.5, .5, 1), precision (1, .5, 2/3). Interpolated
    # precision is 1 for the 51 recall points 0.00..0.50 and 2/3 for the 50 points above.
    gt = make_gt({1: [(1, [10, 10, 20, 20]), (1, [60, 60, 20, 20])]})
    dets = [
        det(1, [10, 10, 20, 20], 0.9),
        det(1, [100, 5, 20, 20], 0.8),
        det(1, [60, 60, 20, 20], 0.7),
    ]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["AP"] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iou_thresholds(backend):
    # IoU 0.72 matches at 0.50, 0.55, 0.60, 0.65, 0.70 (5 of 10 thresholds).
    gt = make_gt({1: [(1, [0, 0, 10, 10])]})
    m = evaluation.evaluate(gt, [det(1, [0, 0, 10, 7.2], 0.9)], backend=backend)
    assert (m["AP50"], m["AP75"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert m["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_area_ranges_very_tiny_and_tiny(backend):
    # 7x7 = 49 px^2 is very tiny (< 8^2); 9x9 = 81 px^2 is tiny (8^2..16^2). Only the 7x7
    # object is detected.
    gt = make_gt({1: [(1, [10, 10, 7, 7]), (1, [50, 50, 9, 9])]})
    m = evaluation.evaluate(gt, [det(1, [10, 10, 7, 7], 0.9)], backend=backend)
    assert m["AP_vt"] == pytest.approx(1.0)
    assert m["AR_vt"] == pytest.approx(1.0)
    assert m["AP_t"] == pytest.approx(0.0)
    assert m["AR_t"] == pytest.approx(0.0)
    assert m["AP_s"] == -1.0 and m["AP_m"] == -1.0  # no ground truth in these ranges
    assert m["AR@1500"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_dets_1500(backend):
    # 1499 higher-scoring false positives keep the true positive inside the 1500 kept; 1500 push
    # it out.
    gt = make_gt({1: [(1, [0, 0, 4, 4])]})
    rng = np.random.default_rng(0)
    far = [[float(x), float(y), 3.0, 3.0] for x, y in rng.uniform(20, 120, (1500, 2))]
    tp = det(1, [0, 0, 4, 4], 0.1)
    inside = evaluation.evaluate(gt, [det(1, b, 0.5) for b in far[:1499]] + [tp], backend=backend)
    outside = evaluation.evaluate(gt, [det(1, b, 0.5) for b in far] + [tp], backend=backend)
    assert inside["AR@1500"] == pytest.approx(1.0)
    assert inside["AR@100"] == pytest.approx(0.0)
    assert inside["AP"] == pytest.approx(1 / 1500)
    assert outside["AR@1500"] == 0.0 and outside["AP"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_class_and_mean(backend):
    gt = make_gt({1: [(1, [10, 10, 20, 20]), (2, [50, 50, 20, 20])]}, categories=(1, 2))
    dets = [
        det(1, [10, 10, 20, 20], 0.9, 1),
        det(1, [90, 90, 20, 20], 0.9, 2),
        det(1, [50, 50, 20, 20], 0.8, 2),
    ]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["per_class"]["class1"]["AP"] == pytest.approx(1.0)
    assert m["per_class"]["class2"]["AP"] == pytest.approx(0.5)
    assert m["AP"] == pytest.approx(0.75)
    text = evaluation.format_table(m)
    assert "area=verytiny | maxDets=1500 ]" in text and "class2" in text


def random_set(seed, num_images=20, num_gt=12, num_dets=60, categories=(1, 3, 7)):
    """Random tiny boxes with near-duplicate detections, tied scores and ignore/crowd regions."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 128, "height": 128})
        gts = []
        for _ in range(num_gt):
            w, h = rng.uniform(2, 40, 2)
            x, y = rng.uniform(0, 100, 2)
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(rng.choice(categories)),
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": int(rng.random() < 0.05),
                "ignore": int(rng.random() < 0.05),
            }
            anns.append(ann)
            gts.append(ann)
        for _ in range(num_dets):
            if rng.random() < 0.5:
                g = gts[rng.integers(len(gts))]
                box = np.asarray(g["bbox"]) + rng.normal(0, 1.5, 4)
                box[2:] = np.abs(box[2:])
                category = g["category_id"]
            else:
                box = np.concatenate([rng.uniform(0, 100, 2), rng.uniform(1, 40, 2)])
                category = int(rng.choice(categories))
            score = float(np.round(rng.random(), 2))  # ties exercise the sort order
            dets.append(det(image_id, box.tolist(), score, category))
    cats = [{"id": c, "name": f"class{c}"} for c in categories]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _floats(metrics):
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for name, values in metrics["per_class"].items():
        flat.update({f"{name}/{k}": v for k, v in values.items()})
    return flat


@pytest.mark.parametrize("protocol", ["aitod", "tinyperson"])
@pytest.mark.parametrize(
    "seed, num_images, num_dets",
    [(0, 20, 60), (1, 8, 250)],  # 250 > TinyPerson's 200 maxDets
)
def test_fast_backend_equals_pycocotools(protocol, seed, num_images, num_dets):
    gt, dets = random_set(seed, num_images=num_images, num_dets=num_dets)
    slow = _floats(evaluation.evaluate(gt, dets, protocol=protocol, backend="pycocotools"))
    fast = _floats(evaluation.evaluate(gt, dets, protocol=protocol, backend="faster_coco_eval"))
    assert slow.keys() == fast.keys()
    assert 0 < slow["AP50" if protocol == "aitod" else "AP50_all"] < 1
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-4), key


def test_fast_backend_equals_pycocotools_arrays():
    gt, dets = random_set(2, num_images=10)
    g, _ = results.load_ground_truth(gt)
    d = results.load_detections(dets, g)
    arrays = [
        coco_tiny.run_cocoeval(
            g, d, area_ranges=coco_tiny.AITOD_AREA_RANGES, max_dets=(1, 10, 100), backend=b
        )
        for b in BACKENDS
    ]
    np.testing.assert_allclose(arrays[0].precision, arrays[1].precision, atol=1e-4)
    np.testing.assert_allclose(arrays[0].recall, arrays[1].recall, atol=1e-4)


def test_unknown_backend_and_protocol():
    gt = make_gt({1: [(1, [0, 0, 4, 4])]})
    with pytest.raises(ValueError, match="backend"):
        evaluation.evaluate(gt, [], backend="nope")
    with pytest.raises(ValueError, match="protocol"):
        evaluation.evaluate(gt, [], protocol="voc")
