"""BinaryConv / BinaryDense against independent numpy computations, L_R and its gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfrdet_jax import layers


def np_sign(x):
    """The paper's sign: +1 for x > 0, -1 for x <= 0."""
    return np.where(x > 0, 1.0, -1.0).astype(np.float32)


def np_reconstruction_loss(w, alpha):
    """L_R = 1/2 ||w - alpha * sign(w)||^2 of one kernel, output channels last."""
    w = np.asarray(w)
    return 0.5 * np.sum((w - np.asarray(alpha) * np_sign(w)) ** 2)


def np_conv(x, w, stride, pads, dilation=1, groups=1, pad_value=0.0):
    """Direct NHWC/HWIO convolution with explicit (low, high) pads filled with ``pad_value``."""
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=pad_value)
    b, h, wd, _ = x.shape
    kh, kw, cg, out = w.shape
    ho = (h - (kh - 1) * dilation - 1) // stride + 1
    wo = (wd - (kw - 1) * dilation - 1) // stride + 1
    y = np.zeros((b, ho, wo, out), np.float64)
    og = out // groups
    for g in range(groups):
        xs, ws = x[..., g * cg : (g + 1) * cg], w[..., g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :,
                    i * dilation : i * dilation + (ho - 1) * stride + 1 : stride,
                    j * dilation : j * dilation + (wo - 1) * stride + 1 : stride,
                ]
                y[..., g * og : (g + 1) * og] += patch @ ws[i, j]
    return y


# (input hw, kernel, stride, padding spec, expected explicit pads, dilation, groups)
CONV_CASES = [
    (8, 3, 1, "SAME", ((1, 1), (1, 1)), 1, 1),
    (8, 3, 2, "SAME", ((0, 1), (0, 1)), 1, 1),  # out 4: total pad 1, extra on the high side
    (9, 3, 2, "SAME", ((1, 1), (1, 1)), 1, 1),
    (8, 3, 1, "VALID", ((0, 0), (0, 0)), 1, 1),
    (9, 3, 2, "VALID", ((0, 0), (0, 0)), 1, 1),
    (8, 3, 1, "SAME", ((1, 1), (1, 1)), 1, 2),
    (8, 3, 2, "SAME", ((0, 1), (0, 1)), 1, 4),
    (8, 3, 1, "SAME", ((2, 2), (2, 2)), 2, 1),
    (7, 1, 2, "SAME", ((0, 0), (0, 0)), 1, 1),
    (8, 3, 1, 1, ((1, 1), (1, 1)), 1, 1),
    (8, 3, 1, [(0, 2), (1, 0)], ((0, 2), (1, 0)), 1, 1),
]


@pytest.mark.parametrize("hw,k,stride,padding,pads,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("pad_value", [1.0, -1.0, 0.0])
def test_binary_conv_matches_numpy(hw, k, stride, padding, pads, dilation, groups, pad_value):
    rng = np.random.default_rng(hw * 7 + k + stride + groups)
    x = rng.normal(size=(2, hw, hw, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 0.0  # sign(0) must be -1 (the paper's sign), for inputs and weights alike
    layer = layers.BinaryConv(
        8,
        (k, k),
        strides=stride,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        pad_value=pad_value,
        use_bias=True,
    )
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    params = variables["params"]
    alpha = rng.uniform(0.1, 1.0, size=(8,)).astype(np.float32)
    bias = rng.normal(size=(8,)).astype(np.float32)
    w = np.array(params["kernel"])
    w[0, 0, 0, 0] = 0.0
    params = {"kernel": jnp.asarray(w), "alpha": jnp.asarray(alpha), "bias": jnp.asarray(bias)}
    y = layer.apply({"params": params}, jnp.asarray(x))
    expected = np_conv(np_sign(x), np_sign(w), stride, pads, dilation, groups, pad_value)
    expected = expected * alpha + bias
    assert y.shape == expected.shape
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)


def test_padding_holds_exactly_the_pad_value():
    """A 1x1 all-ones kernel on a padded border reads back exactly the pad value."""
    x = jnp.full((1, 3, 3, 1), 0.7)
    for pad_value in (1.0, -1.0, 0.0):
        layer = layers.BinaryConv(
            1,
            (3, 3),
            padding="SAME",
            pad_value=pad_value,
            scale="none",
            kernel_init=nn.initializers.ones,
        )
        y = layer.apply(layer.init(jax.random.key(0), x), x)
        # Corner sees 4 inputs (sign = +1) and 5 padded cells.
        assert float(y[0, 0, 0, 0]) == 4 + 5 * pad_value
        assert float(y[0, 1, 1, 0]) == 9


@pytest.mark.parametrize("scale", ["learned", "mean", "none"])
def test_scale_modes(scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 6, 6, 4)).astype(np.float32)
    layer = layers.BinaryConv(5, (3, 3), scale=scale, pad_value=-1.0)
    variables = layer.init(jax.random.key(1), jnp.asarray(x))
    w = np.asarray(variables["params"]["kernel"])
    mean_abs = np.abs(w).mean(axis=(0, 1, 2))
    if scale == "learned":
        np.testing.assert_allclose(np.asarray(variables["params"]["alpha"]), mean_abs, rtol=1e-6)
    else:
        assert "alpha" not in variables["params"]
    alpha = mean_abs if scale != "none" else np.ones(5, np.float32)
    expected = np_conv(np_sign(x), np_sign(w), 1, ((1, 1), (1, 1)), pad_value=-1.0) * alpha
    y = layer.apply({"params": variables["params"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_real_input_is_not_binarized():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 5, 5, 3)).astype(np.float32)
    layer = layers.BinaryConv(4, (3, 3), input_quantizer=None)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    w = np.asarray(variables["params"]["kernel"])
    alpha = np.asarray(variables["params"]["alpha"])
    expected = np_conv(x, np_sign(w), 1, ((1, 1), (1, 1))) * alpha
    np.testing.assert_allclose(
        np.asarray(layer.apply(variables, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5
    )


def test_binary_dense_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 2, 10)).astype(np.float32)
    layer = layers.BinaryDense(6, use_bias=True)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    p = variables["params"]
    expected = (np_sign(x) @ np_sign(np.asarray(p["kernel"]))) * np.asarray(
        p["alpha"]
    ) + np.asarray(p["bias"])
    y = layer.apply({"params": p}, jnp.asarray(x))
    assert y.shape == (3, 2, 6)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_input_gradient_is_the_approx_sign_ste():
    """d sum(y)/dx = ApproxSign'(x) * (d sum(y) / d sign(x)), the latter from a plain conv."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1.5, 1.5, size=(1, 6, 6, 3)).astype(np.float32)
    layer = layers.BinaryConv(4, (3, 3), input_quantizer="approx")
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    gx = jax.grad(lambda v: layer.apply(variables, v).sum())(jnp.asarray(x))
    w = np.asarray(variables["params"]["kernel"])
    alpha = np.asarray(variables["params"]["alpha"])
    # d sum(conv(xb, w)) / d xb[p, q, c] = sum over kernel taps reaching (p, q) of sum_o alpha_o w.
    tap_sum = (np_sign(w) * alpha).sum(axis=-1)  # [3, 3, c_in]
    d_xb = np.zeros((6, 6, 3))
    for p in range(6):
        for q in range(6):
            for i in range(3):
                for j in range(3):
                    op, oq = (
                        p - i + 1,
                        q - j + 1,
                    )  # output position whose window tap (i, j) hits (p, q)
                    if 0 <= op < 6 and 0 <= oq < 6:
                        d_xb[p, q] += tap_sum[i, j]
    expected = np.maximum(2 - 2 * np.abs(x[0]), 0) * d_xb
    np.testing.assert_allclose(np.asarray(gx[0]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_value", [0.0, -1.0])
@pytest.mark.parametrize("stride,pads", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_kernel_and_alpha_gradients_match_numpy(pad_value, stride, pads):
    """For L = sum(y * G): dL/dw = alpha * (sign(x) padded (*)^T G) * [|w| <= 1] (the clipped
    weight STE) and dL/dalpha = sum((sign(x) (*) sign(w)) * G), with the padding, zeros (inside
    the conv) or another value (explicit), holding pad_value in both."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    layer = layers.BinaryConv(4, (3, 3), strides=stride, pad_value=pad_value)
    params = layer.init(jax.random.key(3), jnp.asarray(x))["params"]
    params = {**params, "kernel": params["kernel"] * 3}  # some weights past the STE's clip at 1
    w, alpha = np.asarray(params["kernel"]), np.asarray(params["alpha"])
    g = rng.normal(size=(2, 8 // stride, 8 // stride, 4)).astype(np.float32)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, jnp.asarray(x)) * g))(params)

    xpad = np.pad(np_sign(x), [(0, 0), pads[0], pads[1], (0, 0)], constant_values=pad_value)
    ho, wo = g.shape[1:3]
    d_binary = np.zeros_like(w, np.float64)
    for i in range(3):
        for j in range(3):
            patch = xpad[
                :, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride
            ]
            d_binary[i, j] = np.einsum("bhwc,bhwo->co", patch, g)
    expected_kernel = d_binary * alpha * (np.abs(w) <= 1)
    expected_alpha = (np_conv(np_sign(x), np_sign(w), stride, pads, pad_value=pad_value) * g).sum(
        axis=(0, 1, 2)
    )
    assert 0 < (np.abs(w) > 1).mean() < 1
    np.testing.assert_allclose(np.asarray(grads["kernel"]), expected_kernel, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["alpha"]), expected_alpha, rtol=1e-4, atol=1e-3)


def test_reconstruction_loss_value_and_gradients():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32) * 0.1
    w[0, 0, 0, :2] = 0.0  # sign(0) = -1: L_R pulls a zero weight towards -alpha (grad +alpha)
    alpha = rng.uniform(0.01, 0.2, size=(5,)).astype(np.float32)
    value = 0.5 * np.sum((w - alpha * np_sign(w)) ** 2)
    dw = w - alpha * np_sign(w)
    dalpha = w[..., 0].size * alpha - np.abs(w).sum(axis=(0, 1, 2))
    got, (gw, galpha) = jax.value_and_grad(layers.reconstruction_loss, (0, 1))(
        jnp.asarray(w), jnp.asarray(alpha)
    )
    np.testing.assert_allclose(float(got), value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(galpha), dalpha, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer", ["clipped", "identity", "approx"])
def test_binarize_with_reconstruction_has_the_gradients_of_the_ste_and_l_r(quantizer):
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32) * 0.8  # some |w| > 1: clipped STEs
    w[0, 0, 0, :2] = 0.0
    alpha = rng.uniform(0.01, 0.5, size=(5,)).astype(np.float32)
    cotangent = rng.normal(size=w.shape).astype(np.float32)

    def objective(binarize):
        def f(w, alpha):
            binary, l_r = binarize(w, alpha)
            return jnp.sum(binary * cotangent) + 0.3 * l_r

        return jax.value_and_grad(f, (0, 1))(jnp.asarray(w), jnp.asarray(alpha))

    value, (gw, galpha) = objective(
        lambda w, a: layers.binarize_with_reconstruction(w, a, quantizer)
    )
    composed = objective(
        lambda w, a: (layers.get_binary_quantizer(quantizer)(w), layers.reconstruction_loss(w, a))
    )
    np.testing.assert_allclose(float(value), float(composed[0]), rtol=1e-6)
    np.testing.assert_allclose(gw, composed[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(galpha, composed[1][1], rtol=1e-6, atol=1e-6)
    surrogate = {
        "clipped": (np.abs(w) <= 1).astype(np.float32),
        "identity": np.ones_like(w),
        "approx": np.maximum(2 - 2 * np.abs(w), 0),
    }[quantizer]
    np.testing.assert_allclose(  # by hand: the STE's term plus 0.3 * (w - alpha * sign(w))
        gw, cotangent * surrogate + 0.3 * (w - alpha * np_sign(w)), rtol=1e-5, atol=1e-6
    )
    n = w[..., 0].size
    np.testing.assert_allclose(
        galpha, 0.3 * (n * alpha - np.abs(w).sum(axis=(0, 1, 2))), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"Unknown weight quantizer 'none'.*approx"):
        layers.binarize_with_reconstruction(jnp.asarray(w), jnp.asarray(alpha), "none")


def test_l_r_keeps_no_kernel_copy_for_the_backward_pass():
    """XLA's buffers for the gradient of a stack of 1-bit matmuls with L_R: autodiff of L_R
    alone holds w - alpha * sign(w) per layer until the backward pass; the fused op holds none
    (measured as kernel-sized temporaries added per layer, between 2 and 6 layers)."""
    n = 128

    def per_layer(binarize):
        def loss(kernels, alphas, x):
            total = 0.0
            for w, a in zip(kernels, alphas):
                binary, l_r = binarize(w, a)
                x = jnp.tanh((x @ binary) * a)
                total = total + l_r
            return jnp.sum(x) + 1e-3 * total

        sizes = []
        for depth in (2, 6):
            args = ([jnp.full((n, n), 0.01)] * depth, [jnp.ones(n)] * depth, jnp.ones((2, n)))
            compiled = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile()
            sizes.append(compiled.memory_analysis().temp_size_in_bytes / (n * n * 4))
        return (sizes[1] - sizes[0]) / 4

    fused = per_layer(lambda w, a: layers.binarize_with_reconstruction(w, a, "clipped"))
    composed = per_layer(
        lambda w, a: (layers.sign_clipped_ste(w), layers.reconstruction_loss(w, a))
    )
    assert composed > 0.9 and fused < 0.1, (composed, fused)


def test_a_learned_alpha_pushed_negative_still_scales_positively():
    """One SGD step drives channel 0's alpha parameter below zero: the layer scales that channel
    by |alpha| (its output keeps the sign of sign(x) (*) sign(w)), and L_R's gradient for the
    parameter is the documented sign(a) * (n * |a| - sum|w|)."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 3)).astype(np.float32))
    layer = layers.BinaryConv(4, (3, 3), pad_value=-1.0)
    params = layer.init(jax.random.key(0), x)["params"]
    unscaled = layer.apply({"params": {**params, "alpha": jnp.ones(4)}}, x)  # sign(x) (*) sign(w)

    def loss(p):  # rewards a smaller scale of channel 0 only
        return jnp.sum(layer.apply({"params": p}, x)[..., 0] * unscaled[..., 0])

    a0 = float(params["alpha"][0])
    g0 = float(jax.grad(loss)(params)["alpha"][0])
    assert g0 == pytest.approx(float(jnp.sum(unscaled[..., 0] ** 2)), rel=1e-5)
    tx = optax.sgd(3 * a0 / g0)  # a0 - 3 * a0 = -2 * a0
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    alpha = np.asarray(moved["alpha"])
    np.testing.assert_allclose(alpha[0], -2 * a0, rtol=1e-5)
    np.testing.assert_array_equal(alpha[1:], np.asarray(params["alpha"])[1:])
    y, state = layer.apply({"params": moved}, x, mutable=[layers.LOSSES_COLLECTION])
    np.testing.assert_allclose(y, np.asarray(unscaled) * np.abs(alpha), rtol=1e-6)
    assert np.all(np.sign(np.asarray(y[..., 0])) == np.sign(np.asarray(unscaled[..., 0])))

    w = np.asarray(moved["kernel"])
    sown = layers.total_reconstruction_loss(state[layers.LOSSES_COLLECTION])
    np.testing.assert_allclose(
        float(sown), 0.5 * np.sum((w - np.abs(alpha) * np_sign(w)) ** 2), rtol=1e-5
    )

    def l_r(p):
        _, s = layer.apply({"params": p}, x, mutable=[layers.LOSSES_COLLECTION])
        return layers.total_reconstruction_loss(s[layers.LOSSES_COLLECTION])

    n = w[..., 0].size
    expected = np.sign(alpha) * (n * np.abs(alpha) - np.abs(w).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(
        np.asarray(jax.grad(l_r)(moved)["alpha"]), expected, rtol=1e-5, atol=1e-6
    )


class _Nested(nn.Module):
    """Three binary layers at different depths, one without a scale (so without L_R)."""

    @nn.compact
    def __call__(self, x):
        x = layers.BinaryConv(4, (3, 3), name="conv")(x)
        x = _Inner(name="inner")(x)
        x = layers.BinaryConv(4, (1, 1), scale="none", name="unscaled")(x)
        return layers.BinaryDense(3, scale="mean", name="dense")(x.mean(axis=(1, 2)))


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.BinaryConv(4, (3, 3), name="deep")(x)
        return nn.BatchNorm(use_running_average=True)(x)


def test_total_reconstruction_loss_sums_every_layer():
    x = jnp.ones((2, 8, 8, 3))
    model = _Nested()
    variables = model.init(jax.random.key(0), x)
    variables = {k: v for k, v in variables.items() if k != "losses"}
    _, state = model.apply(variables, x, mutable=["losses"])
    total = float(layers.total_reconstruction_loss(state["losses"]))
    assert float(layers.total_reconstruction_loss(state)) == total
    p = variables["params"]

    dense_w = np.asarray(p["dense"]["kernel"])
    expected = (
        np_reconstruction_loss(p["conv"]["kernel"], p["conv"]["alpha"])
        + np_reconstruction_loss(p["inner"]["deep"]["kernel"], p["inner"]["deep"]["alpha"])
        + np_reconstruction_loss(dense_w, np.abs(dense_w).mean(axis=0))
    )
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    assert total > 0
    # Nothing is sown, nor computed into state, when the collection is not mutable.
    assert float(layers.total_reconstruction_loss({})) == 0.0


class _SharedThrice(nn.Module):
    """One binary layer applied to three inputs, as a head is over the pyramid levels."""

    @nn.compact
    def __call__(self, xs):
        conv = layers.BinaryConv(4, (3, 3), name="shared")
        return [conv(x) for x in xs]


def test_a_layer_called_several_times_sows_one_reconstruction_loss():
    """Eq. 3 sums L_R over layers: a layer applied three times counts its kernel once, in the
    value and in the gradient (w - alpha * sign(w), not three times that)."""
    xs = [jnp.full((1, 6 + 2 * i, 6 + 2 * i, 3), 0.5) for i in range(3)]
    model = _SharedThrice()
    params = model.init(jax.random.key(0), xs)["params"]

    def l_r(p):
        _, state = model.apply({"params": p}, xs, mutable=[layers.LOSSES_COLLECTION])
        sown = state[layers.LOSSES_COLLECTION]["shared"][layers.RECONSTRUCTION_LOSS_NAME]
        assert len(sown) == 1
        return layers.total_reconstruction_loss(state[layers.LOSSES_COLLECTION])

    w, alpha = np.asarray(params["shared"]["kernel"]), np.asarray(params["shared"]["alpha"])
    value, grads = jax.value_and_grad(l_r)(params)
    np.testing.assert_allclose(float(value), np_reconstruction_loss(w, alpha), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grads["shared"]["kernel"]), w - alpha * np_sign(w), rtol=1e-5, atol=1e-7
    )


def test_unknown_names_raise_with_choices():
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"Unknown scale 'per_tensor'.*learned.*mean.*none"):
        layers.BinaryConv(2, (3, 3), scale="per_tensor").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"Unknown binary quantizer 'tanh'"):
        layers.BinaryConv(2, (3, 3), input_quantizer="tanh").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"Unknown padding 'FULL'"):
        layers.BinaryConv(2, (3, 3), padding="FULL").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"feature_group_count=3"):
        layers.BinaryConv(3, (3, 3), feature_group_count=3).init(jax.random.key(0), x)


def test_jit_vmap_and_bf16():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)).astype(np.float32))
    layer = layers.BinaryConv(6, (3, 3), strides=2)
    variables = layer.init(jax.random.key(0), x)
    eager = layer.apply(variables, x)
    jitted = jax.jit(layer.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    # vmap over an extra leading axis of inputs equals applying on each slice.
    stacked = jnp.stack([x, -x])
    mapped = jax.vmap(layer.apply, in_axes=(None, 0))(variables, stacked)
    np.testing.assert_allclose(
        np.asarray(mapped[1]), np.asarray(layer.apply(variables, -x)), rtol=1e-6, atol=1e-6
    )
    # bf16 compute with f32 parameters: +-1 products sum exactly, only alpha is rounded.
    layer16 = layers.BinaryConv(6, (3, 3), strides=2, dtype=jnp.bfloat16)
    y16 = jax.jit(layer16.apply)(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert variables["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(eager), rtol=1e-2, atol=1e-3)
    grads = jax.grad(lambda p: layer16.apply({"params": p}, x).astype(jnp.float32).sum())(
        variables["params"]
    )
    assert grads["kernel"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grads["kernel"])))


def test_activation_helpers():
    x = jnp.array([[-2.0, -0.5, 0.5, 3.0]])
    bias_layer = layers.LearnableBias()
    variables = bias_layer.init(jax.random.key(0), x)
    assert variables["params"]["bias"].shape == (4,)
    shifted = bias_layer.apply({"params": {"bias": jnp.array([1.0, 0.0, -1.0, 2.0])}}, x)
    np.testing.assert_allclose(np.asarray(shifted), [[-1.0, -0.5, -0.5, 5.0]])

    act = layers.RPReLU()
    params = act.init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(np.asarray(params["negative_slope"]), [0.25] * 4)
    params = {
        "negative_slope": jnp.full((4,), 0.1),
        "shift_in": jnp.array([0.0, -1.0, 1.0, 0.0]),
        "shift_out": jnp.array([0.5, 0.0, 0.0, -1.0]),
    }
    y = act.apply({"params": params}, x)
    shifted = np.array([-2.0, 0.5, -0.5, 3.0])
    expected = np.where(shifted > 0, shifted, 0.1 * shifted) + np.array([0.5, 0.0, 0.0, -1.0])
    np.testing.assert_allclose(np.asarray(y)[0], expected, rtol=1e-6)
    plain = layers.RPReLU(learn_shifts=False)
    assert set(plain.init(jax.random.key(0), x)["params"]) == {"negative_slope"}


@pytest.mark.parametrize("slope", [np.float32(0.25), np.array([0.25, -0.5, 0.0], np.float32)])
def test_prelu_value_and_gradients_match_numpy(slope):
    """Slopes of either sign and zero, scalar or one per channel, and inputs at exactly 0 (the
    slope's side)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    x[0, 0] = [0.0, -0.0, 0.0]
    g = rng.normal(size=x.shape).astype(np.float32)
    y, vjp = jax.vjp(layers.prelu, jnp.asarray(x), jnp.asarray(slope))
    d_x, d_slope = vjp(jnp.asarray(g))
    positive = x > 0
    np.testing.assert_allclose(np.asarray(y), np.where(positive, x, slope * x), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d_x), np.where(positive, g, slope * g), rtol=1e-6)
    expected_slope = np.where(positive, 0.0, g * x).sum(axis=(0, 1))
    if np.ndim(slope) == 0:
        expected_slope = expected_slope.sum()
    assert d_slope.shape == np.shape(slope)
    np.testing.assert_allclose(np.asarray(d_slope), expected_slope, rtol=1e-5, atol=1e-6)


class _TinyBinaryClassifier(nn.Module):
    """A user model: real stem, two binary residual blocks, real classifier."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(16, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        for _ in range(2):
            y = layers.LearnableBias()(x)
            y = layers.BinaryConv(16, (3, 3))(y)
            y = nn.BatchNorm(use_running_average=not train)(y)
            x = layers.RPReLU()(y + x)
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def test_tiny_user_classifier_trains():
    rng = np.random.default_rng(8)
    images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    labels = (images[..., 0].mean(axis=(1, 2)) > 0).astype(np.int32)
    images[..., 0] += np.where(labels, 1.0, -1.0)[:, None, None]  # a learnable signal
    model = _TinyBinaryClassifier()
    variables = model.init(jax.random.key(0), jnp.asarray(images), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits, state = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats", "losses"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce + 1e-4 * layers.total_reconstruction_loss(state["losses"]), (ce, state)

        (_, (ce, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state["batch_stats"], opt_state, ce

    losses = []
    for _ in range(25):
        params, batch_stats, opt_state, ce = step(params, batch_stats, opt_state)
        losses.append(float(ce))
    assert losses[-1] < 0.5 * losses[0], losses


def test_real_weights_for_staged_training():
    """weight_quantizer 'none': sign(x) (*) w with real, unscaled w and no L_R (ReActNet's first
    step); with input_quantizer 'none' too, a plain real conv in the 1-bit layer's place."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 3)).astype(np.float32))
    for input_quantizer in ("approx", "none"):
        layer = layers.BinaryConv(
            4,
            (3, 3),
            padding=1,
            input_quantizer=input_quantizer,
            weight_quantizer="none",
            scale="learned",
        )
        variables = layer.init(jax.random.key(0), x)
        assert set(variables["params"]) == {"kernel"}  # no alpha
        y, state = layer.apply(variables, x, mutable=[layers.LOSSES_COLLECTION])
        assert not state.get(layers.LOSSES_COLLECTION)
        w = np.asarray(variables["params"]["kernel"])
        xin = np.asarray(x[0]) if input_quantizer == "none" else np_sign(np.asarray(x[0]))
        xin = np.pad(xin, ((1, 1), (1, 1), (0, 0)))
        expected = np.zeros((5, 5, 4))
        for i in range(5):
            for j in range(5):
                expected[i, j] = np.einsum("abc,abco->o", xin[i : i + 3, j : j + 3], w)
        np.testing.assert_allclose(np.asarray(y[0]), expected, rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)["params"]["kernel"]
        assert np.abs(np.asarray(grad)).sum() > 0
