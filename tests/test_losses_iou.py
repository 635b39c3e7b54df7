"""GIoU / IoU and centre-ness losses against hand values, numpy and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.losses import iou as L


def np_iou_giou(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    c = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union, inter / union - (c - union) / c


PRED = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [2, 3, 9, 12], [20, 20, 30, 25]], np.float32)
TARGET = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 1, 8, 9], [0, 0, 10, 10]], np.float32)
WEIGHTS = np.array([1.0, 2.0, 0.5, 1.0], np.float32)


def test_hand_values():
    # identical: 0; half overlap: IoU 50/150, enclosing = union -> 1 - 1/3;
    # disjoint: union 150, enclosing 30 x 25 = 750 -> 1 - (0 - 600/750) = 1.8.
    losses = [float(L.giou_loss(PRED[i], TARGET[i])) for i in (0, 1, 3)]
    np.testing.assert_allclose(losses, [0.0, 2 / 3, 1.8], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.iou_loss(PRED[3], TARGET[3]), 1.0)


def test_weighted_sums_match_numpy():
    ref = np.array([np_iou_giou(p, q) for p, q in zip(PRED.astype(float), TARGET.astype(float))])
    np.testing.assert_allclose(
        L.giou_loss(PRED, TARGET, WEIGHTS), ((1 - ref[:, 1]) * WEIGHTS).sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        L.iou_loss(PRED, TARGET, WEIGHTS), ((1 - ref[:, 0]) * WEIGHTS).sum(), rtol=1e-5
    )
    log_ref = -np.log(np.maximum(ref[:, 0], 1e-6))
    np.testing.assert_allclose(
        L.iou_loss(PRED, TARGET, WEIGHTS, mode="log"), (log_ref * WEIGHTS).sum(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="mode"):
        L.iou_loss(PRED, TARGET, mode="square")


def finite_difference(f, x, h=1e-5):
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return fd


@pytest.mark.parametrize("which", [1, 2, 3])  # partial overlaps and disjoint boxes
def test_giou_gradient_matches_finite_differences(which):
    pred, target = PRED[which], TARGET[which].astype(np.float64)
    grad = jax.grad(lambda p: L.giou_loss(p, jnp.asarray(target, jnp.float32)))(pred)
    fd = finite_difference(lambda p: 1 - np_iou_giou(p, target)[1], pred.astype(np.float64))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
    grad = jax.grad(lambda p: L.iou_loss(p, jnp.asarray(target, jnp.float32)))(pred)
    fd = finite_difference(lambda p: 1 - np_iou_giou(p, target)[0], pred.astype(np.float64))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)


def test_masked_zero_targets_keep_finite_gradients():
    # Non-positive FCOS points carry all-zero box targets and weight 0.
    grad = jax.grad(lambda p: L.giou_loss(p, jnp.zeros((2, 4)), jnp.zeros(2)))(PRED[:2])
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_centerness_loss_and_gradient():
    logits = np.array([-3.0, 0.0, 2.0, 5.0], np.float32)
    targets = np.array([0.2, 0.5, 1.0, 0.0], np.float32)
    weights = np.array([1.0, 1.0, 0.0, 2.0], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(
        L.centerness_loss(logits, targets, weights), (bce * weights).sum(), rtol=1e-5
    )
    grad = jax.grad(lambda x: L.centerness_loss(x, targets, weights))(logits)
    np.testing.assert_allclose(grad, (p - targets) * weights, rtol=1e-5, atol=1e-7)
    ltrb = jnp.array([[2.0, 1.0, 6.0, 4.0]])
    np.testing.assert_allclose(L.centerness_target(ltrb), [np.sqrt(2 / 6 * 1 / 4)], rtol=1e-6)
