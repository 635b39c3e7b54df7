"""Box geometry against numpy and hand-worked values."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax.ops import boxes as B


def random_boxes(rng, n, size=64.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def np_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union
    return out


def np_giou(p, q):
    iou = np_iou(p[None], q[None])[0, 0]
    inter_union = ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])) / (1 + iou)
    c = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return iou - (c - inter_union) / c


def test_area_and_hand_iou():
    a = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    b = jnp.array([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_allclose(B.box_area(b), [100.0, 200.0, 100.0])
    np.testing.assert_allclose(B.pairwise_iou(a, b), [[25.0 / 175.0, 0.0, 1.0]], rtol=1e-6)
    # GIoU of disjoint boxes: enclosing box 0..30 x 0..40 = 1200, union 300.
    np.testing.assert_allclose(B.paired_giou(a[0], b[1]), -(1200.0 - 300.0) / 1200.0, rtol=1e-6)
    np.testing.assert_allclose(B.paired_giou(a[0], b[2]), 1.0, rtol=1e-6)


def test_pairwise_and_paired_match_numpy():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    ref = np_iou(a, b)
    np.testing.assert_allclose(B.pairwise_iou(a, b), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.paired_iou(a[:5], b), np.diag(ref[:5]), rtol=1e-5, atol=1e-6)
    ref_giou = [np_giou(p.astype(np.float64), q.astype(np.float64)) for p, q in zip(a[:5], b)]
    np.testing.assert_allclose(B.paired_giou(a[:5], b), ref_giou, rtol=1e-5, atol=1e-6)


def test_degenerate_boxes_are_finite():
    z = jnp.zeros((4,))
    assert float(B.pairwise_iou(z[None], z[None])[0, 0]) == 0.0
    assert np.isfinite(float(B.paired_giou(z, z)))


def test_format_conversions():
    xyxy = jnp.array([[2.0, 4.0, 12.0, 10.0]])
    np.testing.assert_allclose(B.xyxy_to_xywh(xyxy), [[2.0, 4.0, 10.0, 6.0]])
    np.testing.assert_allclose(B.xyxy_to_cxcywh(xyxy), [[7.0, 7.0, 10.0, 6.0]])
    np.testing.assert_allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(xyxy)), xyxy)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(xyxy)), xyxy)


def test_clip_boxes():
    boxes = jnp.array([[-5.0, -1.0, 70.0, 30.0], [10.0, 50.0, 20.0, 90.0]])
    np.testing.assert_allclose(
        B.clip_boxes(boxes, 40, 64), [[0.0, 0.0, 64.0, 30.0], [10.0, 40.0, 20.0, 40.0]]
    )
    per_box = B.clip_boxes(boxes, jnp.array([40.0, 60.0]), jnp.array([64.0, 15.0]))
    np.testing.assert_allclose(per_box, [[0.0, 0.0, 64.0, 30.0], [10.0, 50.0, 15.0, 60.0]])


def test_ltrb_encode_decode():
    points = jnp.array([[6.0, 6.0], [10.0, 2.0]])
    box = jnp.array([2.0, 4.0, 12.0, 10.0])
    ltrb = B.ltrb_encode(points, box)
    np.testing.assert_allclose(ltrb, [[4.0, 2.0, 6.0, 4.0], [8.0, -2.0, 2.0, 8.0]])
    np.testing.assert_allclose(B.ltrb_encode(points, box, stride=2.0), ltrb / 2.0)
    strides = jnp.array([2.0, 4.0])
    normed = B.ltrb_encode(points, box, stride=strides)
    np.testing.assert_allclose(normed, ltrb / strides[:, None])
    np.testing.assert_allclose(B.ltrb_decode(points, normed, stride=strides), [box, box])


def test_delta_encode_decode():
    anchor = jnp.array([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), size (10, 20)
    box = jnp.array([2.0, 4.0, 22.0, 14.0])  # centre (12, 9), size (20, 10)
    weights = (10.0, 10.0, 5.0, 5.0)
    expected = [10 * 7 / 10, 10 * -1 / 20, 5 * math.log(2.0), 5 * math.log(0.5)]
    deltas = B.delta_encode(anchor, box, weights)
    np.testing.assert_allclose(deltas, expected, rtol=1e-6)
    np.testing.assert_allclose(B.delta_decode(anchor, deltas, weights), box, rtol=1e-5)
    # Huge dw/dh are clamped at log(1000/16): width = 10 * 62.5.
    wild = B.delta_decode(anchor, jnp.array([0.0, 0.0, 50.0, 50.0]))
    np.testing.assert_allclose(wild[2] - wild[0], 625.0, rtol=1e-5)
    np.testing.assert_allclose(wild[3] - wild[1], 1250.0, rtol=1e-5)


def test_centerness_target():
    ltrb = jnp.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(
        B.centerness_target(ltrb), [math.sqrt(1 / 3 * 2 / 4), 1.0, 0.0], rtol=1e-6
    )


def test_jit_and_batched_shapes():
    rng = np.random.default_rng(1)
    a = random_boxes(rng, 6).reshape(2, 3, 4)
    out = jax.jit(jax.vmap(B.pairwise_iou))(a, a)
    assert out.shape == (2, 3, 3)
    np.testing.assert_allclose(np.diagonal(out, axis1=1, axis2=2), 1.0, rtol=1e-6)
