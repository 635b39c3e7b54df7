"""The LSQ 4-bit variant: LSQConv / LSQDense against numpy (forward and LSQ's gradients), the
lsq4 config and a train step, weight steps derived on transfer, complexity and export."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_pretrained import torchvision_state_dict

from dfrdet_jax import complexity, export, layers, steps
from dfrdet_jax.models import pretrained, registry
from dfrdet_jax.models.common import BinarySpec, ConvUnit
from dfrdet_jax.models.resnet import ResNet

Q_MIN, Q_MAX = -8, 7  # signed 4 bits


def np_lsq(v, step):
    """(q(v), dq/dv, dq/dstep before LSQ's gradient scale) of signed 4-bit LSQ, by hand."""
    r = v / step
    inside = (r >= Q_MIN) & (r <= Q_MAX)
    forward = np.round(np.clip(r, Q_MIN, Q_MAX)) * step
    d_step = np.where(inside, np.round(r) - r, np.where(r < Q_MIN, Q_MIN, Q_MAX))
    return forward, inside.astype(np.float64), d_step


def np_windows(x, k, stride, pads):
    """Zero-padded x [B, H, W, C] -> (padded x, [(i, j, window [B, Ho, Wo, C])] per kernel tap)."""
    xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    taps = [
        (i, j, xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride])
        for i in range(k)
        for j in range(k)
    ]
    return xp, taps


@pytest.fixture
def conv_case():
    """A 3x3 stride-2 LSQConv with explicit asymmetric padding, parameters set so that some
    weights and inputs fall outside the clipping range; returns (layer, params, x, cotangent)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 6, 3)) * 2.5).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    params = {
        "kernel": kernel,
        "weight_step": np.array([0.3, 0.05, 0.2, 0.12], np.float32),  # channel 1 clips a lot
        "input_step": np.float32(0.45),
    }
    layer = layers.LSQConv(4, (3, 3), strides=2, padding=[(1, 1), (0, 1)])
    cotangent = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    return layer, params, x, cotangent


def test_conv_init_steps_follow_lsq_and_the_constant():
    x = jnp.zeros((1, 6, 6, 3))  # the dummy image's zeros: no data to initialise from
    variables = layers.LSQConv(4, (3, 3)).init(jax.random.key(0), x)["params"]
    kernel = np.asarray(variables["kernel"])
    np.testing.assert_allclose(
        variables["weight_step"], 2 * np.abs(kernel).mean(axis=(0, 1, 2)) / np.sqrt(7), rtol=1e-6
    )
    np.testing.assert_allclose(variables["input_step"], 2 * 0.8 / np.sqrt(7), rtol=1e-6)


def test_conv_forward_matches_numpy(conv_case):
    layer, params, x, _ = conv_case
    qk, _, _ = np_lsq(params["kernel"].astype(np.float64), params["weight_step"])
    qx, _, _ = np_lsq(x.astype(np.float64), params["input_step"])
    _, taps = np_windows(qx, 3, 2, [(1, 1), (0, 1)])
    expected = sum(np.einsum("bhwc,co->bhwo", window, qk[i, j]) for i, j, window in taps)
    got = layer.apply({"params": params}, x)
    assert got.shape == expected.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_conv_gradients_match_lsq_by_hand(conv_case):
    layer, params, x, g = conv_case
    g = g.astype(np.float64)
    qk, dk_inside, dk_step = np_lsq(params["kernel"].astype(np.float64), params["weight_step"])
    qx, dx_inside, dx_step = np_lsq(x.astype(np.float64), params["input_step"])
    xp, taps = np_windows(qx, 3, 2, [(1, 1), (0, 1)])
    d_qk = np.zeros_like(qk)
    d_xp = np.zeros_like(xp)
    for i, j, window in taps:
        d_qk[i, j] = np.einsum("bhwc,bhwo->co", window, g)
        d_xp[:, i : i + 6 : 2, j : j + 6 : 2] += np.einsum("co,bhwo->bhwc", qk[i, j], g)
    d_qx = d_xp[:, 1:-1, 0:-1]  # the padding's gradient goes nowhere
    # LSQ's gradient scale: 1 / sqrt(values per step * q_max); 27 weights per output channel.
    expected = {
        "kernel": d_qk * dk_inside,
        "weight_step": (d_qk * dk_step).sum(axis=(0, 1, 2)) / np.sqrt(27 * Q_MAX),
        "input_step": (d_qx * dx_step).sum() / np.sqrt(x.size * Q_MAX),
    }

    def loss(p, inputs):
        return jnp.sum(layer.apply({"params": p}, inputs) * g.astype(np.float32))

    grads, d_x = jax.grad(loss, (0, 1))(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(d_x), d_qx * dx_inside, rtol=1e-4, atol=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(grads[name]), value, rtol=1e-4, atol=1e-5)
    assert np.any(dk_inside == 0) and np.any(dx_inside == 0)  # both clip somewhere


def test_dense_kernel_takes_at_most_16_levels_per_channel():
    layer = layers.LSQDense(5)
    x = jnp.eye(40)  # rows of the identity read out the quantized kernel (input step 1: exact)
    params = dict(layer.init(jax.random.key(3), x)["params"], input_step=jnp.float32(1.0))
    params["kernel"] = params["kernel"] * 3.0  # wider than the initial steps' range: clips
    quantized = np.asarray(layer.apply({"params": params}, x))  # [40, 5]
    codes = quantized / np.asarray(params["weight_step"])
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() >= Q_MIN - 1e-4 and codes.max() <= Q_MAX + 1e-4
    for channel in range(5):
        assert len(np.unique(np.round(codes[:, channel]))) <= 16


def _unit_shapes(bits: int) -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter path -> shape of a strided 4 -> 6 channel quantized ConvUnit."""
    unit = ConvUnit(6, 3, strides=2, binary=BinarySpec(enabled=True, bits=bits))
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    variables = jax.eval_shape(lambda v: unit.init(jax.random.key(0), v, train=False), x)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: leaf.shape for path, leaf in params.items()}


def test_binary_spec_bits_and_the_unit():
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="bits must be 1 .* or 2-8"):
            BinarySpec(enabled=True, bits=bad)
    shapes = {bits: _unit_shapes(bits) for bits in (1, 4)}
    assert {"conv/kernel", "conv/weight_step", "conv/input_step"} <= set(shapes[4])
    assert "conv/alpha" in shapes[1] and "conv/alpha" not in shapes[4]
    # The same unit around the conv: every other tensor has the 1-bit unit's path and shape.
    same = {k: v for k, v in shapes[1].items() if k != "conv/alpha"}
    assert same == {k: v for k, v in shapes[4].items() if "_step" not in k}


def test_lsq4_config_and_one_fcos_train_step(smoke_config, make_batch):
    config = smoke_config("lsq4")
    assert config.model.binary.bits == 4
    assert tuple(config.model.binary_parts) == ("backbone", "neck", "head")  # as bnn's
    assert config.loss.reconstruction_weight == 0 and config.loss.dfr_weight == 0
    assert not config.dfr.levels
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 1)
    params = traverse_util.flatten_dict(state.params, sep="/")
    assert not any(path.endswith("/alpha") for path in params)
    assert "backbone/stage2_block1/unit1/conv/weight_step" in params
    new_state, metrics = jax.jit(steps.make_train_step(config, model, 1))(state, make_batch())
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["loss"] > 0 and metrics["loss_reconstruction"] == 0
    moved = traverse_util.flatten_dict(new_state.params, sep="/")
    for path in ("backbone/stage2_block1/unit1/conv/weight_step", "neck/output2/conv/input_step"):
        assert np.any(np.asarray(moved[path]) != np.asarray(params[path])), path  # steps learn


def _backbone(spec: BinarySpec, width: int = 8, size: int = 32):
    x = jnp.zeros((1, size, size, 3))
    init = jax.jit(functools.partial(ResNet(18, width, spec).init, train=False))  # one program
    variables = init(jax.random.key(0), x)
    return jax.tree.map(np.asarray, {k: variables[k] for k in ("params", "batch_stats")})


def test_transfer_from_the_real_topology_derives_weight_steps():
    topology = BinarySpec(enabled=True, input_quantizer="none", weight_quantizer="none")
    source = jax.tree.map(lambda v: v + 0.5, _backbone(topology))  # distinct from any init
    target = _backbone(BinarySpec(enabled=True, bits=4))
    with pytest.raises(ValueError, match="bits"):
        pretrained.transfer_matching(target, source, source_name="topology")
    moved, report = pretrained.transfer_matching(target, source, source_name="topology", bits=4)
    flat, src = (traverse_util.flatten_dict(v, sep="/") for v in (moved, source))
    weight_steps = [p for p in flat if p.endswith("/conv/weight_step")]
    assert len(weight_steps) == 16 and sorted(report.derived) == sorted(weight_steps)
    for path in weight_steps:
        kernel = path[: -len("weight_step")] + "kernel"
        np.testing.assert_array_equal(flat[kernel], src[kernel])
        np.testing.assert_allclose(
            # float32 means against numpy's float64: 1e-6 is under their rounding on some CPUs
            flat[path],
            2 * np.abs(src[kernel]).mean(axis=(0, 1, 2)) / np.sqrt(7),
            rtol=1e-5,
        )
    assert {p.rsplit("/", 1)[1] for p in report.initialised} == {"input_step"}
    assert not report.skipped  # the same topology: every source tensor has its place


def test_torchvision_weights_into_an_lsq_backbone():
    target = _backbone(BinarySpec(enabled=True, bits=4), width=64)
    loaded, report = pretrained.load_torchvision_resnet(
        target, torchvision_state_dict(18), depth=18, binary=True, bits=4, source="sd"
    )
    flat = traverse_util.flatten_dict(loaded, sep="/")
    assert len(report.derived) == 16 and all(p.endswith("/weight_step") for p in report.derived)
    path = "params/stage3_block1/unit2/conv/"
    np.testing.assert_allclose(
        flat[path + "weight_step"],
        2 * np.abs(flat[path + "kernel"]).mean(axis=(0, 1, 2)) / np.sqrt(7),
        rtol=1e-6,
    )
    input_steps = [p for p in report.initialised if p.endswith("/conv/input_step")]
    assert len(input_steps) == 16
    assert {p.split("/")[-2] for p in report.initialised if p not in input_steps} == {"bias", "act"}


class Mixed(nn.Module):
    """A real conv, a 4-bit conv and a 4-bit dense layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="real")(x)  # 8x8x3 -> 8x8x4
        x = layers.LSQConv(6, (3, 3), strides=2, name="lsq")(x)  # -> 4x4x6
        return layers.LSQDense(5, name="dense")(x)  # -> 4x4x5


def test_complexity_counts_4_bits_per_weight_and_an_eighth_of_a_mac():
    trace = complexity.trace_layers(Mixed(), (8, 8))
    assert trace.binary_kernels == {}  # latent_weight_decay=False leaves LSQ kernels decayed
    assert trace.kbit_kernels == {("lsq", "kernel"): 4, ("dense", "kernel"): 4}
    got = trace.complexity()
    # Real: conv 3*3*3*4 + 4 bias; steps 6 + 1 and 5 + 1. 4-bit: 3*3*4*6 and 6*5 weights.
    assert got.real_params == 112 + 7 + 6 and got.kbit_params == {4: 216 + 30}
    assert got.real_macs == 8 * 8 * 4 * 27
    assert got.kbit_macs == {4: 4 * 4 * 6 * 36 + 4 * 4 * 5 * 6}
    assert got.size_mb == pytest.approx((32 * 125 + 4 * 246) / 8 / 1e6)
    assert got.ops == pytest.approx(got.real_macs + (3456 + 480) / 8)
    assert got.summary()["4bit_params"] == 246


def test_lsq4_detector_counts_the_bnn_layers_at_4_bits(smoke_config):
    counted = {}
    for variant in ("bnn", "lsq4"):
        model = registry.build_model(smoke_config(variant), num_classes=3)
        counted[variant] = complexity.count(model, (64, 64), train=False)
    bnn, lsq = counted["bnn"], counted["lsq4"]
    assert lsq.binary_params == lsq.binary_macs == 0
    assert lsq.kbit_params == {4: bnn.binary_params} and lsq.kbit_macs == {4: bnn.binary_macs}
    assert lsq.real_macs == bnn.real_macs
    input_steps = lsq.real_params - bnn.real_params  # one per layer; weight steps <-> alphas
    assert input_steps == 16 + 6 + 2  # backbone, lateral and output convs, one conv per tower
    assert lsq.size_mb == pytest.approx(
        bnn.size_mb + (3 * bnn.binary_params + 32 * input_steps) / 8e6
    )


def test_export_packs_4_bit_codes_and_restores_the_outputs():
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
    model = Mixed()
    variables = model.init(jax.random.key(0), x)
    trace = complexity.trace_layers(model, (8, 8))
    arrays, packed = export.pack_variables(variables, trace.binary_kernels, trace.kbit_kernels)
    assert packed["params/lsq/kernel"] == {"shape": [3, 3, 4, 6], "bits": 4}
    assert arrays["params/lsq/kernel:codes"].dtype == np.uint8
    assert arrays["params/lsq/kernel:codes"].size == 216 * 4 // 8
    restored = export.unpack_variables(arrays, packed)
    kernel = restored["params"]["lsq"]["kernel"]
    codes = kernel / restored["params"]["lsq"]["weight_step"]
    np.testing.assert_allclose(codes, np.clip(np.round(codes), Q_MIN, Q_MAX), atol=1e-5)
    np.testing.assert_allclose(model.apply(restored, x), model.apply(variables, x), rtol=1e-5)
