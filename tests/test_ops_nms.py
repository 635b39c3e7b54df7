"""Class-wise NMS against a plain numpy greedy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.ops.nms import class_wise_nms


def np_iou(a, b):
    iw = np.maximum(0.0, np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]))
    ih = np.maximum(0.0, np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]))
    inter = iw * ih

    def area(x):
        return (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])

    return inter / (area(a) + area(b) - inter)


def np_nms(boxes, scores, classes, valid, iou_thr, score_thr, max_det):
    """Indices kept by greedy per-class NMS, in descending score order."""
    idx = [i for i in np.argsort(-scores, kind="stable") if valid[i] and scores[i] > score_thr]
    kept = []
    for i in idx:
        same = [k for k in kept if classes[k] == classes[i]]
        if not same or np_iou(boxes[i], boxes[same]).max() <= iou_thr:
            kept.append(i)
    return kept[:max_det]


def random_inputs(seed, k=300, num_classes=3, size=100.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size, (k, 2))
    wh = rng.uniform(4, 30, (k, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = rng.permutation(k).astype(np.float32) / k  # distinct: no ties
    classes = rng.integers(0, num_classes, k).astype(np.int32)
    valid = rng.uniform(size=k) > 0.1
    return boxes, scores, classes, valid


def check(out, boxes, scores, classes, kept, max_det):
    n = len(kept)
    assert out.valid.shape == (max_det,)
    np.testing.assert_array_equal(out.valid, np.arange(max_det) < n)
    np.testing.assert_allclose(out.boxes[:n], boxes[kept])
    np.testing.assert_allclose(out.scores[:n], scores[kept])
    np.testing.assert_array_equal(out.classes[:n], classes[kept])
    # Padding slots are zero / -1.
    assert not np.any(out.boxes[n:]) and not np.any(out.scores[n:])
    assert np.all(out.classes[n:] == -1)


nms_jit = jax.jit(
    class_wise_nms,
    static_argnames=("iou_threshold", "score_threshold", "max_detections", "pre_nms_top_k"),
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_thr", [0.3, 0.5])
def test_matches_numpy_reference(seed, iou_thr):
    boxes, scores, classes, valid = random_inputs(seed)
    kept = np_nms(boxes, scores, classes, valid, iou_thr, 0.05, 1000)
    out = nms_jit(
        boxes,
        scores,
        classes,
        valid,
        iou_threshold=iou_thr,
        score_threshold=0.05,
        max_detections=400,
        pre_nms_top_k=300,
    )
    assert 20 < len(kept) < 300  # suppression actually happened
    check(out, boxes, scores, classes, kept, 400)


def test_max_detections_truncates_greedy_order():
    boxes, scores, classes, valid = random_inputs(3)
    kept = np_nms(boxes, scores, classes, valid, 0.5, 0.05, 10)
    out = nms_jit(boxes, scores, classes, valid, max_detections=10, pre_nms_top_k=300)
    assert len(kept) == 10
    check(out, boxes, scores, classes, kept, 10)


def test_pre_nms_top_k_limits_candidates():
    boxes, scores, classes, valid = random_inputs(4)
    top = np.argsort(-np.where(valid, scores, -1))[:50]
    keep_top = np.zeros_like(valid)
    keep_top[top] = True
    kept = np_nms(boxes, scores, classes, valid & keep_top, 0.5, 0.05, 1000)
    out = nms_jit(boxes, scores, classes, valid, max_detections=100, pre_nms_top_k=50)
    check(out, boxes, scores, classes, kept, 100)


def test_thresholds_classes_and_validity_by_hand():
    boxes = np.array(
        [
            [0, 0, 10, 10],
            [1, 0, 11, 10],
            [0, 0, 10, 10],
            [50, 50, 60, 60],
            [0, 0, 10, 10],
            [1, 1, 11, 11],
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.05, 0.95, 0.6], np.float32)
    classes = np.array([0, 0, 1, 0, 0, 0], np.int32)
    valid = np.array([True, True, True, True, False, True])
    # Box 1 overlaps box 0 with IoU 90/110 > 0.5: suppressed. Box 2 is another class: kept.
    # Box 3 has score == threshold: dropped. Box 4 is invalid. Box 5: IoU with box 0 is
    # 81/119 > 0.5: suppressed.
    out = nms_jit(boxes, scores, classes, valid, max_detections=4)
    np.testing.assert_array_equal(out.valid, [True, True, False, False])
    np.testing.assert_allclose(out.scores[:2], [0.9, 0.7])
    np.testing.assert_array_equal(out.classes[:2], [0, 1])
    # A suppressed box does not suppress others: with a 0.75 threshold box 5 (IoU 0.68 with
    # box 0) survives although box 1 (suppressed by box 0) overlaps it more.
    out = nms_jit(boxes, scores, classes, valid, iou_threshold=0.75, max_detections=4)
    np.testing.assert_allclose(out.scores, [0.9, 0.7, 0.6, 0.0])


def test_no_candidates():
    boxes, scores, classes, _ = random_inputs(5, k=20)
    out = nms_jit(boxes, scores, classes, np.zeros(20, bool), max_detections=5)
    assert not np.any(out.valid) and np.all(out.classes == -1)


def test_vmap_over_batch():
    inputs = [random_inputs(s, k=120) for s in (6, 7)]
    stacked = [np.stack(x) for x in zip(*inputs)]
    fn = jax.jit(jax.vmap(lambda *a: class_wise_nms(*a, max_detections=150, pre_nms_top_k=120)))
    out = fn(*stacked)
    assert out.boxes.shape == (2, 150, 4)
    for b, (boxes, scores, classes, valid) in enumerate(inputs):
        kept = np_nms(boxes, scores, classes, valid, 0.5, 0.05, 150)
        check(jax.tree.map(lambda x: x[b], out), boxes, scores, classes, kept, 150)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="class_wise_nms"):
        class_wise_nms(jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(2, jnp.int32), jnp.ones(3, bool))
