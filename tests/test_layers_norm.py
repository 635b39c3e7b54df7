"""layers.GroupNorm: flax's values, gradients by hand in float64, and one buffer less per layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke

from dfrdet_jax import layers


def _numpy_group_norm(x, scale, bias, groups, g, eps=1e-6):
    """GroupNorm's output and the gradients of sum(output * g), in float64, from the
    definition: x_hat = (x - mean) / sqrt(var + eps) over each example's group."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    shape = x.shape
    grouped = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    axes = (1, 3)
    n = grouped.shape[1] * grouped.shape[3]
    mean = grouped.mean(axis=axes, keepdims=True)
    inv = 1 / np.sqrt(grouped.var(axis=axes, keepdims=True) + eps)
    x_hat = ((grouped - mean) * inv).reshape(shape)
    y = x_hat * scale + bias
    d_hat = (g * scale).reshape(grouped.shape)
    xh = x_hat.reshape(grouped.shape)
    d_x = inv * (
        d_hat - d_hat.sum(axis=axes, keepdims=True) / n
        - xh * (d_hat * xh).sum(axis=axes, keepdims=True) / n
    )  # fmt: skip
    reduce = tuple(range(len(shape) - 1))
    return y, d_x.reshape(shape), (g * x_hat).sum(axis=reduce), g.sum(axis=reduce)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [((2, 5, 6, 8), 4), ((3, 12), 3), ((2, 4, 4, 32), 32), ((2, 3, 3, 3, 6), 2)],
)
def test_values_equal_flax_and_gradients_equal_the_definition(shape, groups):
    rng = np.random.default_rng(len(shape) + groups)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    scale = rng.normal(size=shape[-1:]).astype(np.float32)
    bias = rng.normal(size=shape[-1:]).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    ours, theirs = layers.GroupNorm(groups), nn.GroupNorm(groups)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(
        theirs.init(jax.random.key(0), x)
    )

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * g)

    np.testing.assert_array_equal(ours.apply(params, x), theirs.apply(params, x))
    y, d_x, d_scale, d_bias = _numpy_group_norm(x, scale, bias, groups, g)
    np.testing.assert_allclose(ours.apply(params, x), y, rtol=1e-5, atol=1e-5)
    (d_params, got_d_x) = jax.grad(loss(ours), (0, 1))(params, x)
    np.testing.assert_allclose(got_d_x, d_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_params["params"]["scale"], d_scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_params["params"]["bias"], d_bias, rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):  # the same in float64, to 1e-12
        x64, g64 = jnp.asarray(x, jnp.float64), jnp.asarray(g, jnp.float64)
        grads = jax.grad(lambda p, x: jnp.sum(ours.apply(p, x) * g64), (0, 1))(params, x64)
        assert grads[1].dtype == jnp.float64
        np.testing.assert_allclose(grads[1], d_x, rtol=1e-12, atol=1e-12)


def test_a_constant_group_and_bfloat16_follow_flax():
    """A group with zero variance (the clamp's edge): flax's value and gradients; bfloat16 in,
    float32 parameters: flax's output dtype and values, gradients within bfloat16 rounding."""
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    x[0, ..., :4] = 3.0  # example 0, group 0: constant
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    ours, theirs = layers.GroupNorm(2), nn.GroupNorm(2)
    params = theirs.init(jax.random.key(0), x)

    def grads(module, x):
        return jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * g), (0, 1))(params, x)

    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        xd = jnp.asarray(x, dtype)
        want, got = theirs.apply(params, xd), ours.apply(params, xd)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        for a, b in zip(jax.tree.leaves(grads(ours, xd)), jax.tree.leaves(grads(theirs, xd))):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance
            )


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="3 groups do not divide the 8 channels"):
        layers.group_norm(jnp.ones((1, 8)), jnp.ones(8), jnp.zeros(8), 3)


def test_keeps_one_buffer_less_per_layer_than_flax():
    """XLA's temporaries for the gradient of a stack of GroupNorms (tanh after each, which keeps
    its output) grow by one x-sized buffer less per layer than with flax's GroupNorm: the
    centred input is recomputed in the backward pass, not held from the forward pass."""
    x = jnp.ones((2, 16, 16, 32))

    def per_layer(norm):
        def build(depth):
            def loss(params, x):
                for p in params:
                    x = jnp.tanh(norm.apply(p, x))
                return jnp.sum(x)

            return loss, [norm.init(jax.random.key(0), x)] * depth

        return smoke.temp_buffers_per_layer(build, x)

    ours, theirs = per_layer(layers.GroupNorm(8)), per_layer(nn.GroupNorm(8))
    assert theirs - ours >= 0.75, (theirs, ours)
