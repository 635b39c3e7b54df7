"""layers/conv.py: the convolution whose kernel gradient is computed by taps (stride 1) or patches
(strided) on CPU computes what jax.lax.conv_general_dilated computes, output and both gradients,
for every form it serves; a numpy loop checks the tap sum and the patches on their own; forms it
does not serve, and convolutions below its size thresholds, are lax's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dfrdet_jax import layers
from dfrdet_jax.layers import conv as conv_lib


@pytest.fixture(autouse=True)
def taps_at_every_size(monkeypatch):
    """The tests' convolutions are tiny: the tap sum and the patches serve them as they serve
    large ones."""
    monkeypatch.setattr(conv_lib, "MIN_MULTIPLY_ADDS_PER_TAP", 1)
    monkeypatch.setattr(conv_lib, "MIN_MULTIPLY_ADDS_PER_TAP_STRIDED", 1)


def _dims(n):
    return conv_lib.channels_last_dimension_numbers(n + 2)


def _grads(conv, x, kernel, cotangent, **kw):
    out, vjp = jax.vjp(lambda x, k: conv(x, k, **kw), x, kernel)
    return (out, *vjp(cotangent))


def _uses_taps(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize(
    "n, kernel, padding, dilation, stride",
    [
        (2, 3, "SAME", 1, 1),
        (2, 3, [(1, 1), (1, 1)], 1, 1),
        (2, 5, [(0, 2), (-1, 1)], 1, 1),  # asymmetric, and a negative pad (a crop)
        (2, 3, "SAME", 2, 1),
        (2, 1, "VALID", 1, 1),
        (2, 3, "VALID", 1, 1),
        (1, 3, "SAME", 1, 1),
        (3, 3, "SAME", 1, 1),
        # Strided: the kernel gradient by patches.
        (2, 7, [(3, 3), (3, 3)], 1, 2),  # ResNet's stem
        (2, 3, [(1, 1), (1, 1)], 1, 2),
        (2, 1, "VALID", 1, 2),  # a downsampling shortcut
        (2, 3, "SAME", 1, 2),  # odd input, SAME's extra pad on the high side
        (2, 5, [(0, 2), (-1, 1)], 1, (2, 3)),
        (2, 3, "SAME", 2, 2),
        (1, 3, "SAME", 1, 3),
        (3, 3, "SAME", 1, 2),
    ],
)
def test_output_and_gradients_match_lax(n, kernel, padding, dilation, stride):
    rng = np.random.default_rng(n * 100 + kernel)
    spatial = (7,) * n if n == 3 else (11,) * n
    x = jnp.asarray(rng.standard_normal((2, *spatial, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((*(kernel,) * n, 5, 6)), jnp.float32)
    strides = stride if isinstance(stride, tuple) else (stride,) * n
    kw = dict(
        window_strides=strides, padding=padding, rhs_dilation=(dilation,) * n,
        dimension_numbers=_dims(n),
    )  # fmt: skip
    assert _uses_taps(lambda x, k: conv_lib.conv_general_dilated(x, k, **kw), x, k)
    out_shape = lax.conv_general_dilated(x, k, **kw).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    ours = _grads(conv_lib.conv_general_dilated, x, k, cotangent, **kw)
    reference = _grads(lax.conv_general_dilated, x, k, cotangent, **kw)
    np.testing.assert_array_equal(ours[0], reference[0])  # XLA's forward
    np.testing.assert_array_equal(ours[1], reference[1])  # XLA's input gradient
    np.testing.assert_allclose(ours[2], reference[2], rtol=1e-5, atol=1e-4)


def _numpy_kernel_gradient(x, cotangent, window, pads, dilation, strides=(1, 1)):
    """sum over batch and output pixels of x[pixel read by tap] * cotangent, one tap at a time."""
    x = np.pad(x.astype(np.float64), [(0, 0), *pads, (0, 0)])
    b, h_out, w_out, c_out = cotangent.shape
    grad = np.zeros((*window, x.shape[-1], c_out))
    for i in range(window[0]):
        for j in range(window[1]):
            for oh in range(h_out):
                for ow in range(w_out):
                    read = x[:, oh * strides[0] + i * dilation, ow * strides[1] + j * dilation, :]
                    grad[i, j] += read.T @ cotangent[:, oh, ow, :].astype(np.float64)
    return grad


def test_tap_sum_against_a_numpy_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
    pads, dilation = [(2, 1), (1, 2)], 2
    out_h, out_w = 6 + 3 - 2 * dilation, 7 + 3 - 2 * dilation
    cotangent = rng.standard_normal((2, out_h, out_w, 4)).astype(np.float32)
    ours = conv_lib.kernel_gradient_by_taps(
        jnp.asarray(x), jnp.asarray(cotangent), (3, 3, 3, 4), pads, (dilation, dilation)
    )
    expected = _numpy_kernel_gradient(x, cotangent, (3, 3), pads, dilation)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_patches_against_a_numpy_loop():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    pads, dilation, strides = [(2, 1), (1, 2)], 2, (2, 3)
    out_h = (9 + 3 - 2 * dilation - 1) // strides[0] + 1
    out_w = (8 + 3 - 2 * dilation - 1) // strides[1] + 1
    cotangent = rng.standard_normal((2, out_h, out_w, 4)).astype(np.float32)
    ours = conv_lib.kernel_gradient_by_patches(
        jnp.asarray(x), jnp.asarray(cotangent), (3, 3, 3, 4), strides, pads, (dilation,) * 2
    )
    expected = _numpy_kernel_gradient(x, cotangent, (3, 3), pads, dilation, strides)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["grouped", "channels_first", "input_dilation", "no_dimension_numbers"]
)
def test_forms_the_tap_sum_does_not_serve_are_lax(case):
    rng = np.random.default_rng(1)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x_shape, k_shape = (2, 8, 8, 4), (3, 3, 4, 6)
    if case == "grouped":
        kw["feature_group_count"], k_shape = 2, (3, 3, 2, 6)
    elif case == "channels_first":
        kw["dimension_numbers"], x_shape, k_shape = (
            ("NCHW", "OIHW", "NCHW"),
            (2, 4, 8, 8),
            (6, 4, 3, 3),
        )
    elif case == "input_dilation":
        kw["lhs_dilation"], kw["padding"] = (2, 2), [(1, 1), (1, 1)]
    else:
        kw["dimension_numbers"], x_shape, k_shape = None, (2, 4, 8, 8), (6, 4, 3, 3)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    ours = lambda x, k: conv_lib.conv_general_dilated(x, k, **kw)  # noqa: E731
    assert not _uses_taps(ours, x, k)
    cotangent = jnp.ones(lax.conv_general_dilated(x, k, **kw).shape)
    for a, b in zip(
        _grads(conv_lib.conv_general_dilated, x, k, cotangent, **kw),
        _grads(lax.conv_general_dilated, x, k, cotangent, **kw),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_conv_module_is_flax_conv_with_the_tap_gradient():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 9, 4)), jnp.float32)
    ours, flax_conv = layers.Conv(8, (3, 3), name="c"), nn.Conv(8, (3, 3), name="c")
    params = ours.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, flax_conv.init(jax.random.key(0), x))
    assert _uses_taps(lambda p, x: ours.apply(p, x), params, x)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    (value, grads) = jax.value_and_grad(loss(ours), argnums=(0, 1))(params, x)
    (reference, reference_grads) = jax.value_and_grad(loss(flax_conv), argnums=(0, 1))(params, x)
    np.testing.assert_array_equal(value, reference)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        grads,
        reference_grads,
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_bfloat16_kernel_gradient_keeps_the_dtype(stride):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) / 12, jnp.bfloat16)
    kw = dict(window_strides=(stride,) * 2, padding="SAME", dimension_numbers=_dims(2))
    cotangent = jnp.ones((2, 8 // stride, 8 // stride, 8), jnp.bfloat16)
    _, _, ours = _grads(conv_lib.conv_general_dilated, x, k, cotangent, **kw)
    _, _, reference = _grads(
        lax.conv_general_dilated,
        x.astype(jnp.float32),
        k.astype(jnp.float32),
        cotangent.astype(jnp.float32),
        **kw,
    )
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(jnp.float32), reference, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("stride", [1, 2])
def test_below_the_size_threshold_it_is_lax(monkeypatch, stride):
    x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    kw = dict(window_strides=(stride,) * 2, padding="SAME", dimension_numbers=_dims(2))
    per_tap = 2 * (8 // stride) ** 2 * 4 * 6
    pads = conv_lib.explicit_padding("SAME", (8, 8), (3, 3), (stride,) * 2, (1, 1))
    assert conv_lib.multiply_adds_per_tap(x.shape, k.shape, (stride,) * 2, pads, (1, 1)) == (
        per_tap
    )
    threshold = "MIN_MULTIPLY_ADDS_PER_TAP" + ("_STRIDED" if stride > 1 else "")
    monkeypatch.setattr(conv_lib, threshold, per_tap + 1)
    assert not _uses_taps(lambda x, k: conv_lib.conv_general_dilated(x, k, **kw), x, k)
    monkeypatch.setattr(conv_lib, threshold, per_tap)
    assert _uses_taps(lambda x, k: conv_lib.conv_general_dilated(x, k, **kw), x, k)
