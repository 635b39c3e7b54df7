"""Sigmoid focal loss against a float64 numpy reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax.losses.focal import sigmoid_focal_loss, sigmoid_focal_loss_elementwise


def np_focal(logits, labels, alpha=0.25, gamma=2.0):
    logits = np.asarray(logits, np.float64)
    t = np.zeros_like(logits)
    for i, c in enumerate(labels):
        if 0 <= c < logits.shape[1]:
            t[i, c] = 1.0
    p = 1.0 / (1.0 + np.exp(-logits))
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, alpha, 1 - alpha)
    return -at * (1 - pt) ** gamma * np.log(pt)


def inputs():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 3)).astype(np.float32)
    labels = np.array([0, 2, 3, -1, 1, 3], np.int32)  # 3 = background, -1 = also background
    weights = np.array([1.0, 0.5, 1.0, 0.0, 2.0, 1.0], np.float32)
    return logits, labels, weights


def test_elementwise_and_sum_match_numpy():
    logits, labels, weights = inputs()
    ref = np_focal(logits, labels)
    np.testing.assert_allclose(sigmoid_focal_loss_elementwise(logits, labels), ref, rtol=1e-5)
    np.testing.assert_allclose(
        sigmoid_focal_loss(logits, labels, weights), (ref.sum(1) * weights).sum(), rtol=1e-5
    )
    np.testing.assert_allclose(sigmoid_focal_loss(logits, labels), ref.sum(), rtol=1e-5)
    ref_g1 = np_focal(logits, labels, alpha=0.5, gamma=1.0)
    np.testing.assert_allclose(
        sigmoid_focal_loss_elementwise(logits, labels, alpha=0.5, gamma=1.0), ref_g1, rtol=1e-5
    )


def test_hand_value():
    # Positive with logit 0: p = 0.5 -> 0.25 * 0.25 * log 2; negative class: 0.75 * 0.25 * log 2.
    out = sigmoid_focal_loss_elementwise(jnp.zeros((1, 2)), jnp.array([0]))
    np.testing.assert_allclose(out, [[0.0625 * np.log(2), 0.1875 * np.log(2)]], rtol=1e-6)


def test_extreme_logits_are_stable():
    logits = jnp.array([[100.0, -100.0], [-100.0, 100.0]])
    labels = jnp.array([1, 1])
    out = sigmoid_focal_loss_elementwise(logits, labels)
    grad = jax.grad(lambda x: sigmoid_focal_loss(x, labels))(logits)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
    # Confidently wrong: 0.25 * 1 * 100 for the positive, 0.75 * 1 * 100 for the negative.
    np.testing.assert_allclose(out[0], [75.0, 25.0], rtol=1e-5)
    np.testing.assert_allclose(out[1], [0.0, 0.0], atol=1e-30)


def test_gradient_matches_finite_differences():
    logits, labels, weights = inputs()
    grad = jax.grad(lambda x: sigmoid_focal_loss(x, labels, weights))(logits)
    x = logits.astype(np.float64)

    def f(z):
        return (np_focal(z, labels).sum(1) * weights).sum()

    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (f(x + e) - f(x - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
