"""The array path (evaluation/array_cocoeval.py, backend 'numpy') against the COCO API: the same
precision, recall and oLRP arrays as pycocotools and faster_coco_eval on sets built to hit every
rule of COCOeval's matching, and the same metrics from the model's outputs as from result
dicts."""

import math
import os

import numpy as np
import pytest
from test_evaluation_aitod import det, flat_metrics, make_gt, random_set

from dfrdet_jax import data, evaluation
from dfrdet_jax.evaluation import array_cocoeval, coco_tiny, results

REFERENCES = ("pycocotools", "faster_coco_eval")


def edge_set(seed):
    """random_set (crowd regions, near-duplicates, scores rounded to 0.01 so they tie) plus:
    an empty image, an image with ground truth and no detection, one with detections and no
    ground truth, a class with detections and no ground truth (9), 1,600 detections of one
    class in one image (beyond the 1,500 kept), exact duplicates, and boxes of exactly 8, 16
    and 32 px sides (areas on the range borders, ground truth and detections)."""
    gt, dets = random_set(seed, num_images=6, num_gt=10, num_dets=50)
    rng = np.random.default_rng(seed + 100)
    gt["categories"].append({"id": 9, "name": "class9"})
    gt["images"] += [{"id": i, "width": 128, "height": 128} for i in (7, 8, 9, 10)]
    border = [(1, [10, 10, 8, 8]), (3, [30, 10, 16, 16]), (7, [60, 10, 32, 32])]
    border += [(1, [10, 60, 8.0001, 8]), (3, [40, 60, 7.9999, 8])]
    for k, (category, bbox) in enumerate(border):  # image 8: ground truth, no detection
        for image in (1, 8):
            gt["annotations"].append(
                {"id": 1000 + 10 * k + image, "image_id": image, "category_id": category,
                 "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
            )  # fmt: skip
        dets.append(det(1, bbox, 0.55, category))
        dets.append(det(1, np.add(bbox, [0.5, 0, 0, 0]).tolist(), 0.55, category))
    dets += [det(9, [20, 20, 10, 10], 0.9, 3), det(9, [20, 20, 10, 10], 0.3, 9)]  # no gt
    gt["annotations"].append(
        {"id": 2000, "image_id": 10, "category_id": 1, "bbox": [50, 50, 6, 6], "area": 36.0,
         "iscrowd": 0}
    )  # fmt: skip
    # Image 10: 1,600 detections of class 1, scores in 0.05 steps (ties), the true box ranked
    # near the end and repeated.
    for k in range(1600):
        x, y = rng.uniform(0, 120, 2)
        dets.append(det(10, [float(x), float(y), 4.0, 4.0], float(np.round(rng.random(), 1))))
    dets += [det(10, [50, 50, 6, 6], 0.05), det(10, [50, 50, 6, 6], 0.05)]
    dets += [dict(d) for d in dets[:20]]  # exact duplicates of the first detections
    return gt, dets


def _arrays(gt, dets, backend, max_dets=coco_tiny.AITOD_MAX_DETS):
    g, _ = results.load_ground_truth(gt)
    return coco_tiny.run_cocoeval(
        g,
        results.load_detections(dets, g),
        area_ranges=coco_tiny.AITOD_AREA_RANGES,
        max_dets=max_dets,
        backend=backend,
        lrp_areas=tuple(coco_tiny.AITOD_AREA_RANGES),
    )


def _assert_same_arrays(got, want):
    assert got.category_ids == want.category_ids and got.max_dets == want.max_dets
    np.testing.assert_allclose(got.precision, want.precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.recall, want.recall, rtol=0, atol=1e-12)
    assert got.lrp.keys() == want.lrp.keys()
    for key in want.lrp:
        np.testing.assert_allclose(
            got.lrp[key], want.lrp[key], rtol=0, atol=1e-12, equal_nan=True, err_msg=key
        )


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("seed", [0, 1])
def test_arrays_equal_the_coco_api_on_edge_cases(seed, reference):
    gt, dets = edge_set(seed)
    got = _arrays(gt, dets, "numpy")
    _assert_same_arrays(got, _arrays(gt, dets, reference))
    k9 = got.category_ids.index(9)
    assert (got.precision[..., k9, :, :] == -1).all()  # a class without ground truth
    assert (got.precision > 0).sum() > 1000 and (got.precision == 0).sum() > 1000
    assert np.isfinite(got.lrp["oLRP"]).all() and (got.lrp["oLRP"] > 0).sum() >= 8


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (3, 1600)])
def test_arrays_equal_pycocotools_for_other_max_dets(max_dets):
    gt, dets = edge_set(2)
    _assert_same_arrays(
        _arrays(gt, dets, "numpy", max_dets), _arrays(gt, dets, "pycocotools", max_dets)
    )


def test_small_chunks_and_pair_blocks_give_the_same_arrays(monkeypatch):
    # One image per chunk (the chunk limit is below any image's count) and pair blocks of one
    # detection: every boundary case of the chunking.
    gt, dets = edge_set(3)
    whole = _arrays(gt, dets, "numpy")
    monkeypatch.setattr(array_cocoeval, "_CHUNK_DETECTIONS", 7)
    monkeypatch.setattr(array_cocoeval, "_PAIR_BLOCK", 1)
    _assert_same_arrays(_arrays(gt, dets, "numpy"), whole)


@pytest.mark.parametrize("backend", coco_tiny.BACKENDS)
def test_an_equal_overlap_goes_to_the_later_box(backend):
    # The first detection has IoU exactly 0.5 with boxes A and B; COCOeval's loop keeps the
    # later one, B, so the second detection (IoU 0.83 with A only) is a TP too: AP50 = 1.
    # Had A been taken, the second would be a FP: AP50 = 1/2. AR: 2 of 2 found at IoU 0.5, A
    # alone at 0.55-0.8, none above: (1 + 6 / 2) / 10.
    gt = make_gt({1: [(1, [0, 0, 10, 5]), (1, [0, 5, 10, 5])]})
    dets = [det(1, [0, 0, 10, 10], 0.9), det(1, [0, 0, 10, 6], 0.8)]
    m = evaluation.evaluate(gt, dets, backend=backend)
    assert m["AP50"] == pytest.approx(1.0) and m["AR@1500"] == pytest.approx(0.4)


def test_box_overlap_by_hand():
    dets = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 0, 5], [5, 5, 10, 10]], float)
    gts = np.array([[5, 0, 10, 10], [0, 0, 40, 40], [20, 20, 5, 5], [15, 5, 5, 5]], float)
    crowd = np.array([False, True, True, False])
    # 50 / 150; crowd: 100 / the detection's 100; a zero-width detection; touching edges.
    np.testing.assert_array_equal(
        array_cocoeval.box_overlap(dets, gts, crowd), [1 / 3, 1.0, 0.0, 0.0]
    )


@pytest.mark.parametrize("protocol", ["aitod", "tinyperson"])
def test_every_metric_equals_faster_coco_eval(protocol):
    gt, dets = edge_set(4)
    got = evaluation.evaluate(gt, dets, protocol=protocol, backend="numpy")
    want = evaluation.evaluate(gt, dets, protocol=protocol, backend="faster_coco_eval")
    assert got["backend"] == "numpy" and got["summary"] == want["summary"]
    got, want = flat_metrics(got), flat_metrics(want)
    assert got.keys() == want.keys() and len(got) > 40
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-12), key


def test_the_aitod_default_is_the_array_path():
    gt = make_gt({1: [(1, [0, 0, 4, 4])]})
    assert evaluation.evaluate(gt, [])["backend"] == "numpy"
    assert evaluation.evaluate(gt, [], protocol="tinyperson")["backend"] == "faster_coco_eval"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_ids", 3, r"record #1 has image_id 3 that is not in the ground truth"),
        ("boxes", [0, 0, math.inf, 5], r"record #1 has a NaN or infinite bbox/score"),
        ("boxes", [0, 0, 5, -1], r"record #1 has a negative width or height"),
        ("scores", math.nan, r"record #1 has a NaN"),
    ],
)
def test_bad_detection_arrays_name_the_record(field, value, match):
    gt = make_gt({1: [(1, [10, 10, 20, 20])], 2: [(1, [5, 5, 8, 8])]})
    columns = {
        "image_ids": np.array([1, 2]),
        "category_ids": np.array([1, 1]),
        "boxes": np.array([[10.0, 10, 20, 20], [5, 5, 8, 8]]),
        "scores": np.array([0.9, 0.8]),
    }
    columns[field][1] = value
    with pytest.raises(evaluation.EvaluationInputError, match=match):
        evaluation.evaluate(gt, evaluation.DetectionArrays(**columns))


def test_model_outputs_score_as_their_result_dicts(tmp_path):
    # The eval mode's path around the model (evaluate.predict_dataset): batches of the eval
    # split, boxes jittered from the ground truth in resized pixels with random float32 scores
    # (ties included) and background boxes, through detection_arrays, scored by the array
    # path; against the same batches through detections_to_coco, scored by the COCO API.
    gt_file, _ = data.ensure_synthetic(
        str(tmp_path), num_train=1, num_val=5, num_test=1, image_size=64, max_size=24
    )["val"]
    config = data.default_data_config("aitod")
    config.root = os.path.dirname(gt_file)
    config.ann_pattern, config.image_pattern = "{split}.json", "{split}"
    config.image_size = 48
    dataset = data.build_dataset(config, "val", train=False, batch_size=2, seed=0)
    rng = np.random.default_rng(0)
    arrays, dicts = [], []
    for batch in dataset.loader:
        boxes = np.concatenate([batch["boxes"], batch["boxes"]], axis=1)
        boxes = (boxes + rng.normal(0, 0.7, boxes.shape)).astype(np.float32)
        outputs = (
            boxes,
            np.round(rng.random(boxes.shape[:2]), 1).astype(np.float32),
            np.concatenate([batch["labels"], rng.integers(0, 8, batch["labels"].shape)], 1),
            np.concatenate([batch["box_valid"], batch["box_valid"]], axis=1),
            batch["image_id"],
            batch["scale"],
            dataset.category_ids,
        )
        arrays.append(evaluation.detection_arrays(*outputs))
        dicts += evaluation.detections_to_coco(*outputs)
    arrays = evaluation.DetectionArrays.concatenate(arrays)
    assert arrays.scores.dtype == np.float32 and arrays.to_coco() == dicts
    got = evaluation.evaluate(dataset.annotation_file, arrays)
    assert got["backend"] == "numpy" and got["num_detections"] == len(dicts) > 20
    got = flat_metrics(got)
    assert 0 < got["AP50"] < 1
    for reference in REFERENCES:
        want = flat_metrics(evaluation.evaluate(dataset.annotation_file, dicts, backend=reference))
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-12), (reference, key)
