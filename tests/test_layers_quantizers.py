"""Quantizers: forward values and every straight-through gradient, pointwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke

from dfrdet_jax import layers

POINTS = np.array([-2.0, -1.0, -0.999, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5], np.float32)
SIGN = np.array([-1, -1, -1, -1, -1, 1, 1, 1, 1], np.float32)  # the paper's sign(0) = -1


def _pointwise_grad(fn, x):
    return np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(x)))


@pytest.mark.parametrize("name", ["identity", "clipped", "approx"])
def test_forward_is_sign_with_zero_mapped_to_minus_one(name):
    quantize = layers.get_binary_quantizer(name)
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(POINTS))), SIGN)


@pytest.mark.parametrize(("name", "grad_at_zero"), [("identity", 1), ("clipped", 1), ("approx", 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sign_at_exactly_zero_is_minus_one_with_the_ste_gradient(name, grad_at_zero, dtype):
    """The paper's sign (Sec. 3.1: "one if the input is greater than zero and -1 otherwise") at
    +0 and -0, forward; the backward pass is the STE's surrogate at 0, unchanged."""
    quantize = layers.get_binary_quantizer(name)
    zeros = jnp.asarray([0.0, -0.0], dtype)
    np.testing.assert_array_equal(np.asarray(quantize(zeros), np.float32), [-1.0, -1.0])
    np.testing.assert_array_equal(np.asarray(layers.sign(zeros), np.float32), [-1.0, -1.0])
    np.testing.assert_array_equal(
        np.asarray(_pointwise_grad(quantize, zeros), np.float32), [grad_at_zero] * 2
    )


def test_plain_sign_forward_and_zero_gradient():
    np.testing.assert_array_equal(np.asarray(layers.sign(jnp.asarray(POINTS))), SIGN)
    np.testing.assert_array_equal(_pointwise_grad(layers.sign, POINTS), np.zeros_like(POINTS))


def test_identity_ste_gradient_is_one_everywhere():
    np.testing.assert_array_equal(
        _pointwise_grad(layers.sign_identity_ste, POINTS), np.ones_like(POINTS)
    )


def test_clipped_ste_gradient_includes_the_boundary():
    # |x| <= 1 -> 1, else 0: -1.0 and 1.0 pass the gradient.
    expected = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(_pointwise_grad(layers.sign_clipped_ste, POINTS), expected)


def test_approx_sign_gradient_matches_bireal_definition():
    expected = np.array([0, 0, 2 - 2 * 0.999, 1, 2, 1.5, 1, 0, 0], np.float32)
    np.testing.assert_allclose(
        _pointwise_grad(layers.sign_approx_ste, POINTS), expected, rtol=1e-6, atol=1e-6
    )


def test_ste_scales_incoming_cotangent():
    x = jnp.asarray(POINTS)
    cotangent = jnp.arange(1.0, 1.0 + x.size)
    _, vjp = jax.vjp(layers.sign_clipped_ste, x)
    expected = np.asarray(cotangent) * (np.abs(POINTS) <= 1)
    np.testing.assert_allclose(np.asarray(vjp(cotangent)[0]), expected)


def test_ste_keeps_dtype_and_works_in_bf16():
    x = jnp.asarray(POINTS, jnp.bfloat16)
    y = layers.sign_approx_ste(x)
    assert y.dtype == jnp.bfloat16
    g = jax.grad(lambda v: layers.sign_approx_ste(v).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), SIGN)


def test_unknown_quantizer_lists_choices():
    with pytest.raises(ValueError, match=r"'binarize'.*approx.*clipped.*identity"):
        layers.get_binary_quantizer("binarize")
    assert layers.get_binary_quantizer(None) is None
    assert layers.get_binary_quantizer("none") is None


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(a, k):
    return jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=_NHWC)


@pytest.mark.parametrize("name", ["identity", "clipped", "approx"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_apply_to_sign_is_the_ste_then_the_op(name, dtype, scaled):
    """Value and gradients equal those of the plain STE followed by the op (each tested
    pointwise above), with inputs on sign's and the STEs' edges (+-0, +-1). With a
    per-output-channel ``scale`` (a binary layer's alpha), op(ste(x), kernel) * scale: the same
    value exactly, and gradients for x, kernel and scale that the backward pass takes from op
    with the scale folded into the kernel (equal up to float rounding); without, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    x[0, 0, 0] = [0.0, -0.0, 1.0, -1.0]
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), dtype)
    g = jnp.asarray(rng.normal(size=(2, 6, 6, 5)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.2, 2.0, size=(5,)), jnp.float32) if scaled else None
    x = jnp.asarray(x, dtype)
    quantize = layers.get_binary_quantizer(name)

    def fused(x, kernel, scale):
        out = layers.apply_to_sign(_conv, x, kernel, name, scale=scale)
        return jnp.sum(out.astype(jnp.float32) * g)

    def plain(x, kernel, scale):
        out = _conv(quantize(x), kernel)
        out = out if scale is None else out * scale.astype(dtype)
        return jnp.sum(out.astype(jnp.float32) * g)

    wrt = (0, 1, 2) if scaled else (0, 1)
    got, got_grads = jax.value_and_grad(fused, wrt)(x, kernel, scale)
    want, want_grads = jax.value_and_grad(plain, wrt)(x, kernel, scale)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got_grads[0].dtype == got_grads[1].dtype == dtype  # x's and the kernel's
    tolerance = 0 if not scaled else 1e-5 if dtype == jnp.float32 else 3e-2
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())


def test_apply_to_sign_casts_the_sign_and_rejects_unknown_quantizers():
    x = jnp.asarray(POINTS, jnp.float32)
    scale = jnp.ones((), jnp.bfloat16)
    out = layers.apply_to_sign(lambda s, w: s * w, x, scale, "clipped", jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), SIGN)
    with pytest.raises(ValueError, match=r"'binarize'.*approx.*clipped.*identity"):
        layers.apply_to_sign(_conv, x, x, "binarize")


def test_apply_to_sign_keeps_one_input_sized_buffer_per_layer_for_the_backward_pass():
    """XLA's buffers for the gradient of a stack of binary convs (tanh between them, which keeps
    its output: the next layer's input) grow by one input-sized buffer per layer: the input,
    from which the backward pass recomputes its sign. The STE followed by the conv keeps the
    sign as well, two per layer; so does the fused op if its backward pass's sign does not
    wait for the cotangent (XLA:CPU then computes it in the forward pass)."""

    x = jnp.ones((1, 16, 16, 32))

    def per_layer(binary_conv):
        def build(depth):
            def loss(kernels, x):
                for kernel in kernels:
                    x = jnp.tanh(binary_conv(x, kernel))
                return jnp.sum(x)

            return loss, [jnp.ones((3, 3, 32, 32))] * depth

        return smoke.temp_buffers_per_layer(build, x)

    fused = per_layer(lambda x, k: layers.apply_to_sign(_conv, x, k, "approx"))
    plain = per_layer(lambda x, k: _conv(layers.sign_approx_ste(x), k))
    assert fused <= 1.25, fused
    assert plain - fused >= 0.75, (plain, fused)


def _numpy_lsq(x, s, bits, signed):
    """Forward and the LSQ gradients (Esser et al.) computed by hand."""
    q_min, q_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v = x / s
    inside = (v >= q_min) & (v <= q_max)
    forward = np.round(np.clip(v, q_min, q_max)) * s
    g = 1.0 / np.sqrt(x.size * q_max)
    ds = np.where(inside, np.round(v) - v, np.where(v < q_min, q_min, q_max)) * g
    return forward, inside.astype(np.float32), ds.sum()


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (2, True)])
def test_lsq_forward_and_gradients(bits, signed):
    rng = np.random.default_rng(bits + signed)
    x = rng.normal(size=(64,)).astype(np.float32) * 2
    x[0] = 0.3  # stays away from rounding ties
    step = np.float32(0.37)
    forward, dx, ds = _numpy_lsq(x, step, bits, signed)
    y = layers.lsq_quantize(jnp.asarray(x), jnp.asarray(step), bits, signed)
    np.testing.assert_allclose(np.asarray(y), forward, rtol=1e-6, atol=1e-6)
    gx, gs = jax.grad(lambda a, s: layers.lsq_quantize(a, s, bits, signed).sum(), (0, 1))(
        jnp.asarray(x), jnp.asarray(step)
    )
    np.testing.assert_allclose(np.asarray(gx), dx)
    np.testing.assert_allclose(float(gs), ds, rtol=1e-5, atol=1e-6)


def test_lsq_levels_and_init():
    assert layers.lsq_levels(4, True) == (-8, 7)
    assert layers.lsq_levels(4, False) == (0, 15)
    with pytest.raises(ValueError, match="at least 2 bits"):
        layers.lsq_levels(1, True)
    x = jnp.array([[1.0, -3.0], [2.0, 0.0]])
    np.testing.assert_allclose(float(layers.lsq_init_step(x, 4)), 2 * 1.5 / np.sqrt(7), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(layers.lsq_init_step(x, 4, axis=0)),
        2 * np.array([1.5, 1.5]) / np.sqrt(7),
        rtol=1e-6,
    )
