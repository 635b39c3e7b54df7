"""Bit-packed export: kernels round-trip as signs (and mean|w|), detections are unchanged, the
decoder is left out and the file is as small as the paper counts it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from dfrdet_jax import complexity, export, layers
from dfrdet_jax.models import registry


def test_pack_by_hand():
    kernel = np.array([[0.3, -0.2, 0.0], [-1.0, 2.0, -0.5]], np.float32)  # [c_in 2, c_out 3]
    variables = {"params": {"fc": {"kernel": kernel, "alpha": -np.ones(3)}}}
    arrays, packed = export.pack_variables(variables, {("fc", "kernel"): "mean"})
    # Signs row-major, sign(0) = -1: + - - | - + -  ->  bits 100010 padded to a byte.
    assert arrays["params/fc/kernel:bits"].tolist() == [0b10001000]
    np.testing.assert_allclose(arrays["params/fc/kernel:mean_abs"], [0.65, 1.1, 0.25])
    assert packed == {"params/fc/kernel": {"shape": [2, 3], "scale": "mean"}}
    restored = export.unpack_variables(arrays, packed)["params"]["fc"]
    np.testing.assert_allclose(
        restored["kernel"], np.where(kernel > 0, 1.0, -1.0) * [0.65, 1.1, 0.25], rtol=1e-6
    )
    np.testing.assert_array_equal(restored["alpha"], -np.ones(3))  # not a 'learned' layer's
    # A learned alpha is stored as the scale the layer applies, |alpha|.
    arrays, _ = export.pack_variables(variables, {("fc", "kernel"): "learned"})
    np.testing.assert_array_equal(arrays["params/fc/alpha"], np.ones(3))


@pytest.mark.parametrize("layer_type", ["conv", "dense"])
@pytest.mark.parametrize("scale", ["learned", "mean", "none"])
def test_export_round_trips_a_kernel_with_exact_zeros(layer_type, scale):
    """Exact zeros in the latent kernel (and, for 'mean', a whole zero channel) and a negative
    learned alpha: the restored layer binarizes to the same signs and gives the same output."""
    rng = np.random.default_rng(0)
    if layer_type == "conv":
        layer = layers.BinaryConv(4, (3, 3), scale=scale, pad_value=-1.0)
        x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
    else:
        layer = layers.BinaryDense(4, scale=scale)
        x = jnp.asarray(rng.normal(size=(2, 6)).astype(np.float32))
    params = dict(layer.init(jax.random.key(0), x)["params"])
    kernel = np.array(params["kernel"])
    kernel.reshape(-1, 4)[::3] = 0.0  # every third input row: zeros in every channel
    kernel[..., 3] = 0.0  # a whole zero channel
    params["kernel"] = kernel
    if scale == "learned":
        params["alpha"] = np.array([0.5, -0.25, 1.0, -2.0], np.float32)
    variables = {"params": params}
    arrays, packed = export.pack_variables(variables, {("kernel",): scale})
    restored = export.unpack_variables(arrays, packed)
    signs = lambda v: np.asarray(layers.sign(jnp.asarray(v)))  # noqa: E731
    np.testing.assert_array_equal(signs(restored["params"]["kernel"]), signs(kernel))
    expected = np.asarray(layer.apply(variables, x))
    got = np.asarray(layer.apply(restored, x))
    if scale == "mean":  # mean|w| recomputed from sign * stored mean: one rounding away
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[..., 3], 0.0)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("family", "scale"), [("fcos", "learned"), ("faster_rcnn", "mean")])
def test_exported_detector_gives_the_same_outputs(smoke_config, family, scale):
    config = smoke_config("dfr", family=family)
    config.model.binary.scale = scale
    model = registry.build_model(config, num_classes=3)
    images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    # Under one jit: op by op, every op would compile alone.
    init = functools.partial(model.init, train=False, reconstruct=True)
    variables = jax.jit(init)(jax.random.key(0), images)
    # Latent weights far from +-1, so that only their signs and scales can match.
    params = jax.tree.map(lambda p: p * 3.7, variables["params"])
    trace = complexity.trace_layers(model, (64, 64), train=False)
    if scale == "mean":
        # mean|w| is recomputed from the restored kernel (sign * stored mean), one rounding
        # away from the original's; an untrained 1-bit net has exact ties in its integer-valued
        # convolutions that such an ulp flips. |w| a power of two per output channel (1-8,
        # differing between channels) makes the mean exact, so the comparison below checks the
        # packing itself (signs, layout, per-channel scales) bit for bit.
        flat = flatten_dict(params)
        for path in trace.binary_kernels:
            w = np.asarray(flat[path])
            magnitude = 2.0 ** (np.arange(w.shape[-1]) % 4)
            flat[path] = (np.where(w > 0, 1.0, -1.0) * magnitude).astype(np.float32)
        params = unflatten_dict(flat)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    arrays, packed = export.pack_variables(variables, trace.binary_kernels)
    assert packed and not any(name.startswith("params/decoder") for name in arrays)
    binary_weights = sum(int(np.prod(p["shape"])) for p in packed.values())
    assert sum(a.size for n, a in arrays.items() if n.endswith(":bits")) == pytest.approx(
        binary_weights / 8, abs=len(packed)
    )
    restored = export.unpack_variables(arrays, packed)
    apply = jax.jit(functools.partial(model.apply, train=False))
    expected = apply(variables, images)
    got = apply(restored, images)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)
    if scale == "learned":  # alpha is a parameter of its own: the kernels come back as +-1
        flat = {"/".join(k): v for k, v in flatten_dict(restored["params"]).items()}
        assert all(set(np.unique(flat[name[len("params/") :]])) <= {-1.0, 1.0} for name in packed)
