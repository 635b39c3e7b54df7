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


def flat_metrics(metrics):
    """Every float of an evaluate() result, per-class ones as 'class/metric'."""
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
    slow = flat_metrics(evaluation.evaluate(gt, dets, protocol=protocol, backend="pycocotools"))
    fast = flat_metrics(
        evaluation.evaluate(gt, dets, protocol=protocol, backend="faster_coco_eval")
    )
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


# oLRP (the official AI-TOD evaluator's aitodpycocotools/cocoeval.py, accumulate with_lrp) and
# AR@300 (mmdet-aitod's maxDets 100/300/1500).


def lrp_example():
    """One class, 3 ground truths (10x10 px), a crowd region and 5 detections, worked by hand.

    Ranked by score: d0 (0.95) lies inside the crowd region (ignored: neither TP nor FP), d1 (0.9)
    matches G1 at IoU 0.8, d2 (0.8) is a FP, d3 (0.7) matches G2 at IoU 0.7, d4 (0.6) is a FP;
    G3 is missed. With tau = 0.5, N_FN = 3 - N_TP and loc = sum of (1 - IoU) over the TPs, LRP =
    (loc / 0.5 + N_FP + N_FN) / (N_TP + N_FP + N_FN) after each rank:
      d0: (0 + 0 + 3) / 3 = 1;  d1: (0.4 + 0 + 2) / 3 = 0.8;  d2: (0.4 + 1 + 2) / 4 = 0.85;
      d3: (1.0 + 1 + 1) / 4 = 0.75;  d4: (1.0 + 2 + 1) / 5 = 0.8.
    oLRP = 0.75 at d3: loc = 0.5 / 2 TPs = 0.25 (mean 1 - IoU, as the official code, not divided
    by 1 - tau), FP = 1 / (2 + 1) = 1/3, FN = 1 / 3.
    """
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10]), (1, [100, 100, 10, 10])]})
    crowd = {"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 60, 30, 30], "area": 900.0}
    gt["annotations"].append({**crowd, "iscrowd": 1})
    dets = [
        det(1, [5, 65, 10, 10], 0.95),  # inside the crowd region
        det(1, [0, 0, 10, 8], 0.9),  # IoU 80 / 100 with G1
        det(1, [70, 90, 10, 10], 0.8),
        det(1, [50, 50, 10, 7], 0.7),  # IoU 70 / 100 with G2
        det(1, [80, 20, 10, 10], 0.6),
    ]
    return gt, dets


@pytest.mark.parametrize("backend", BACKENDS)
def test_olrp_hand_worked(backend):
    gt, dets = lrp_example()
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["oLRP"] == pytest.approx(0.75)
    assert m["oLRP_loc"] == pytest.approx(0.25)
    assert m["oLRP_FP"] == pytest.approx(1 / 3)
    assert m["oLRP_FN"] == pytest.approx(1 / 3)
    assert m["per_class"]["class1"]["oLRP"] == pytest.approx(0.75)
    g, _ = results.load_ground_truth(gt)
    arrays = coco_tiny.run_cocoeval(
        g,
        results.load_detections(dets, g),
        area_ranges=coco_tiny.AITOD_AREA_RANGES,
        max_dets=coco_tiny.AITOD_MAX_DETS,
        backend=backend,
        lrp_areas=("all",),
    )
    assert arrays.lrp["oLRP_thr"][0, 0] == pytest.approx(0.7)  # the LRP-optimal score
    assert (arrays.lrp["oLRP"][0, 1:] == -1).all()  # only the asked area ranges are computed
    text = "\n".join(m["summary"])
    row = " Optimal LRP             @[ IoU=0.50      | area=     all | maxDets=1500 ] = 0.750"
    assert row in text
    assert "Optimal LRP Loc" in text and "Optimal LRP FP" in text and "Optimal LRP FN" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_olrp_mean_over_classes(backend):
    # class1: the hand-worked 0.75 / 0.25 / 1/3 / 1/3; class2: detected exactly (0 / 0 / 0 / 0);
    # class3: one FP, no TP (oLRP = FN = 1, loc and FP undefined: -1, left out of their means);
    # class4: no ground truth (-1 everywhere, left out of every mean), one detection.
    gt, dets = lrp_example()
    more = make_gt({2: [(2, [10, 10, 6, 6]), (3, [40, 40, 6, 6])]}, categories=(2, 3, 4))
    gt["images"] += more["images"]
    gt["categories"] = make_gt({}, categories=(1, 2, 3, 4))["categories"]
    for i, ann in enumerate(more["annotations"]):
        gt["annotations"].append({**ann, "id": 200 + i})
    dets += [det(2, [10, 10, 6, 6], 0.5, 2), det(2, [90, 90, 6, 6], 0.5, 3)]
    dets += [det(2, [40, 40, 6, 6], 0.5, 4)]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["oLRP"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert m["oLRP_loc"] == pytest.approx((0.25 + 0) / 2)
    assert m["oLRP_FP"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["oLRP_FN"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    pc = m["per_class"]
    assert [pc["class2"][k] for k in coco_tiny.LRP_KEYS] == [0.0, 0.0, 0.0, 0.0]
    assert [pc["class3"][k] for k in coco_tiny.LRP_KEYS] == [1.0, -1.0, -1.0, 1.0]
    assert [pc["class4"][k] for k in coco_tiny.LRP_KEYS] == [-1.0] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_olrp_perfect_and_no_detections(backend):
    gt = make_gt({1: [(1, [10, 10, 20, 20]), (1, [40, 40, 5, 6])], 2: [(1, [0, 0, 12, 9])]})
    perfect = [det(a["image_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    m = evaluation.evaluate(gt, perfect, backend=backend)
    assert [m[k] for k in coco_tiny.LRP_KEYS] == [0.0, 0.0, 0.0, 0.0]
    m = evaluation.evaluate(gt, [], backend=backend)
    assert (m["oLRP"], m["oLRP_FN"]) == (1.0, 1.0)
    assert (m["oLRP_loc"], m["oLRP_FP"]) == (-1.0, -1.0)  # undefined without a TP


def test_fast_backend_equals_pycocotools_lrp_arrays():
    gt, dets = random_set(3, num_images=12, num_dets=120)
    g, _ = results.load_ground_truth(gt)
    d = results.load_detections(dets, g)
    arrays = [
        coco_tiny.run_cocoeval(
            g,
            d,
            area_ranges=coco_tiny.AITOD_AREA_RANGES,
            max_dets=coco_tiny.AITOD_MAX_DETS,
            backend=b,
            lrp_areas=tuple(coco_tiny.AITOD_AREA_RANGES),
        )
        for b in BACKENDS
    ]
    olrp = arrays[0].lrp["oLRP"]
    assert ((olrp > 0) & (olrp < 1)).sum() >= 10  # most entries are non-trivial
    for key in arrays[0].lrp:
        np.testing.assert_allclose(
            arrays[0].lrp[key], arrays[1].lrp[key], atol=1e-12, equal_nan=True, err_msg=key
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ar_at_300(backend):
    # Three exact detections ranked 100th, 300th and 1,000th among far false positives: recall 1/3
    # within the top 100, 2/3 within 300, 1 within 1,500 (at every IoU threshold).
    gt = make_gt({1: [(1, [0, 0, 4, 4]), (1, [10, 0, 4, 4]), (1, [20, 0, 4, 4])]})
    rng = np.random.default_rng(0)
    boxes = [[float(x), float(y), 3.0, 3.0] for x, y in rng.uniform(30, 120, (1000, 2))]
    for rank, g in zip((99, 299, 999), gt["annotations"]):
        boxes[rank] = g["bbox"]
    dets = [det(1, b, (1000 - i) / 1000) for i, b in enumerate(boxes)]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["AR@1"] == 0.0
    assert m["AR@100"] == pytest.approx(1 / 3)
    assert m["AR@300"] == pytest.approx(2 / 3)
    assert m["AR@1500"] == pytest.approx(1.0)
    assert "maxDets= 300 ] = 0.667" in "\n".join(m["summary"])
