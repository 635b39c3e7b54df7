"""The pictures (dfrdet_jax/viz.py) against hand-worked cases; ``--mode viz`` runs end to end in
colabs/figures.ipynb (tests/test_colabs.py)."""

import json

import numpy as np
from PIL import Image

from dfrdet_jax import viz
from dfrdet_jax.evaluation import coco_tiny, results


def test_size_classes_follow_the_aitod_ranges():
    sides = np.array([2.0, 7.9, 8.0, 15.9, 16.0, 31.0, 32.0, 300.0])
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=1)
    np.testing.assert_array_equal(viz.size_class(boxes), [0, 0, 1, 1, 2, 2, 3, 3])


def test_matching_takes_the_best_score_first_and_each_box_once():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    gt_classes = np.array([0, 1])
    boxes = np.array([[1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float)
    scores = np.array([0.5, 0.9, 0.8, 0.7])
    classes = np.array([0, 0, 0, 1])  # the third has the wrong class for the box it covers
    tp, found = viz.match_detections(gt, gt_classes, boxes, scores, classes, 0.5)
    np.testing.assert_array_equal(tp, [False, True, False, False])
    np.testing.assert_array_equal(found, [True, False])


def test_outcomes_draw_each_box_where_it_is_in_its_size_colour(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    gt = np.array([[5, 5, 15, 15], [30, 5, 34, 9]], np.float32)  # tiny, very tiny
    gt_classes = np.array([0, 1])
    boxes = np.array([[5, 5, 15, 15], [40, 20, 50, 30], [0, 30, 4, 34]], np.float32)
    scores = np.array([0.9, 0.8, 0.1])  # the last is under min_score: not drawn
    counts = viz.draw_outcomes(
        image, gt, gt_classes, boxes, scores, np.array([0, 0, 1]), str(tmp_path / "o.png"),
        upscale=3,
    )  # fmt: skip
    assert counts == {"tp": 1, "fp": 1, "missed": 1}
    drawn = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    assert drawn.shape == (40 * 3 + 16, 3 * 60 * 3, 3)
    tiny, very_tiny = viz.SIZE_COLOURS[1], viz.SIZE_COLOURS[0]
    panel = 60 * 3
    assert tuple(drawn[30, 15]) == tiny  # the true positive's left edge, panel 1
    assert tuple(drawn[75, panel + 120]) == tiny  # the false positive's left edge, panel 2
    assert tuple(drawn[21, 2 * panel + 90]) == very_tiny  # the missed box's left edge, panel 3
    assert tuple(drawn[21, 90]) == (0, 0, 0)  # the miss is not drawn as a true positive
    assert not drawn[90:102, 0:12].any()  # nor the low-score detection


def test_pr_curves_of_perfect_and_half_found_detections():
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10 * k, 0, 6, 6],
                "area": 36.0,
                "iscrowd": 0,
            }
            for k in range(4)
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "car"}],
    }
    found = [
        {"image_id": 1, "category_id": 1, "bbox": [10 * k, 0, 6, 6], "score": 0.9 - 0.1 * k}
        for k in range(2)
    ]
    gt, _ = results.load_ground_truth(gt)
    recall, curves = coco_tiny.precision_recall_curves(gt, results.load_detections(found, gt))
    assert recall.shape == (101,)
    np.testing.assert_allclose(curves["vt"][recall <= 0.5], 1.0)  # every detection is right
    np.testing.assert_allclose(curves["vt"][recall > 0.5], 0.0)  # half the objects are found
    np.testing.assert_allclose(curves["t"], -1.0)  # no tiny (8-16 px) object


def test_training_curves_hold_every_loss_part_of_every_run(tmp_path):
    runs = {}
    for name, scale in (("bnn", 1.0), ("dfr", 0.5)):
        path = tmp_path / f"{name}.jsonl"
        lines = [
            {"step": s, "train/loss": scale / s, "train/loss_dfr": 0.1, "lr": 0.1}
            for s in (1, 2, 3)
        ] + [{"step": 3, "eval/AP": 0.2 * scale}]
        path.write_text("\n".join(json.dumps(line) for line in lines))
        runs[name] = str(path)
    viz.plot_training_curves(runs, str(tmp_path / "curves.png"))
    picture = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    assert picture.std() > 5  # lines, not a blank page
