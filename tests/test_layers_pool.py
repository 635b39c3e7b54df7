"""layers.max_pool: flax's values and gradients exactly (ties go to the first maximum of a
window in row-major order) and a hand-worked example. A whole ResNet's gradient, bit-identical
with either pool, is checked through benchmarks/pool_speed.py (tests/test_step_breakdown.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax import layers


def _numpy_max_pool_gradient(x, g, window, strides, padding):
    """d(sum(max_pool(x) * g)) / dx from the definition, in float64: each output's cotangent
    goes to the first maximum of its window (row-major), padding counted as -inf."""
    (k_h, k_w), (s_h, s_w), ((top, bottom), (left, right)) = window, strides, padding
    padded = np.pad(
        x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)),
        constant_values=-np.inf,
    )  # fmt: skip
    grad = np.zeros_like(padded)
    for b, oh, ow, c in np.ndindex(g.shape):
        patch = padded[b, oh * s_h : oh * s_h + k_h, ow * s_w : ow * s_w + k_w, c]
        i, j = np.unravel_index(np.argmax(patch), patch.shape)  # argmax: the first maximum
        grad[b, oh * s_h + i, ow * s_w + j, c] += g[b, oh, ow, c]
    return grad[:, top : top + x.shape[1], left : left + x.shape[2]]


CASES = [
    ((2, 13, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd sizes
    ((1, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),  # windows that do not overlap
    ((2, 9, 10, 4), (3, 2), (1, 2), ((2, 0), (0, 1))),  # uneven windows, strides and padding
]


@pytest.mark.parametrize(("shape", "window", "strides", "padding"), CASES)
@pytest.mark.parametrize("ties", [True, False])
def test_values_and_gradients_equal_flax_and_the_definition(shape, window, strides, padding, ties):
    rng = np.random.default_rng(sum(shape))
    # Few distinct values make ties in most windows (as ReLU's zeros do in a network).
    x = rng.integers(0, 3, shape) if ties else rng.normal(size=shape)
    x = jnp.asarray(x, jnp.float32)
    ours, ours_vjp = jax.vjp(lambda v: layers.max_pool(v, window, strides, padding), x)
    flax, flax_vjp = jax.vjp(lambda v: nn.max_pool(v, window, strides, padding=padding), x)
    g = jnp.asarray(rng.normal(size=flax.shape), jnp.float32)
    np.testing.assert_array_equal(ours, flax)
    np.testing.assert_array_equal(ours_vjp(g)[0], flax_vjp(g)[0])
    expected = _numpy_max_pool_gradient(np.asarray(x), np.asarray(g), window, strides, padding)
    np.testing.assert_allclose(ours_vjp(g)[0], expected, rtol=1e-6, atol=1e-6)


def test_a_hand_worked_example():
    # One 4 x 4 map, 3 x 3 windows, stride 2, padding 1: outputs (0, 0), (0, 1), (1, 0), (1, 1)
    # whose windows span rows and columns [-1, 1] or [1, 3]. The 5 at (1, 1) is the first
    # maximum of the first three windows (in (0, 1)'s it ties with the 5 at (1, 3), in (1, 0)'s
    # with the 5 at (3, 1), and comes first); the 7 at (3, 3) is the last window's maximum.
    x = jnp.array([[0, 1, 0, 2], [3, 5, 1, 5], [0, 0, 4, 1], [2, 5, 1, 7]], jnp.float32).reshape(
        1, 4, 4, 1
    )
    y, vjp = jax.vjp(lambda v: layers.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[5, 5], [5, 7]])
    (dx,) = vjp(jnp.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 2, 2, 1))
    expected = np.zeros((4, 4))
    expected[1, 1] = 1 + 10 + 100
    expected[3, 3] = 1000
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_bfloat16_and_jit():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 4)), jnp.bfloat16)
    pool = jax.jit(lambda v: layers.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))))
    y, vjp = jax.vjp(pool, x)
    flax, flax_vjp = jax.vjp(lambda v: nn.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
    assert y.dtype == jnp.bfloat16
    g = jnp.ones_like(y)
    np.testing.assert_array_equal(y, flax)
    np.testing.assert_array_equal(vjp(g)[0], flax_vjp(g)[0])


def test_rejects_inputs_that_are_not_images():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\].*\(4, 4\)"):
        layers.max_pool(jnp.zeros((4, 4)), (2, 2), (2, 2))
