"""Starting weights: torchvision ResNet state dicts onto the backbone, and detector-to-detector
transfer. The state dicts are written with numpy under torchvision's names and shapes (listed here
by hand from torchvision's ResNet, not from the mapping under test); the real backbone's features
are checked against a numpy forward pass of torchvision's ResNet-18 on those tensors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numpy.lib.stride_tricks import sliding_window_view

from dfrdet_jax.models import pretrained
from dfrdet_jax.models.common import BinarySpec, ConvUnit
from dfrdet_jax.models.resnet import ResNet

BINARY = BinarySpec(enabled=True)
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def torchvision_state_dict(depth: int, width: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of torchvision's resnet{depth}().state_dict(), random, in PyTorch layouts."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, c_out, c_in, k):
        sd[f"{name}.weight"] = rng.normal(0, (2 / (c_in * k * k)) ** 0.5, (c_out, c_in, k, k))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    c_in = width
    for stage, blocks in enumerate(BLOCKS[depth], start=1):
        c = width * 2 ** (stage - 1)
        for b in range(blocks):
            conv(f"layer{stage}.{b}.conv1", c, c_in if b == 0 else c, 3)
            bn(f"layer{stage}.{b}.bn1", c)
            conv(f"layer{stage}.{b}.conv2", c, c, 3)
            bn(f"layer{stage}.{b}.bn2", c)
            if stage > 1 and b == 0:
                conv(f"layer{stage}.{b}.downsample.0", c, c_in, 1)
                bn(f"layer{stage}.{b}.downsample.1", c)
        c_in = c
    sd["fc.weight"] = rng.normal(0, 0.01, (1000, c_in))
    sd["fc.bias"] = np.zeros(1000)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def backbone_variables(depth: int, binary: bool, width: int = 64, size: int = 32):
    model = ResNet(depth, width, BINARY if binary else BinarySpec())
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    variables = {k: variables[k] for k in ("params", "batch_stats")}  # not the sown L_R
    return model, jax.tree.map(np.asarray, variables)


def flat(variables):
    return traverse_util.flatten_dict(variables, sep="/")


# Numpy forward of torchvision's ResNet (eval mode) --------------------------------------------


def np_conv(x, w, stride, pad):
    """x [H, W, C], torch weight [O, I, k, k], symmetric zero padding, as torch.nn.Conv2d."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    k = w.shape[-1]
    windows = sliding_window_view(x, (k, k), axis=(0, 1))[::stride, ::stride]  # h w C k k
    return np.einsum("hwcij,ocij->hwo", windows, w, optimize=True)


def np_bn(x, sd, name, eps=1e-5):
    inv = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + eps)
    return (x - sd[f"{name}.running_mean"]) * inv + sd[f"{name}.bias"]


def np_resnet(x, sd, depth):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(np_bn(np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    x = sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(-2, -1))
    features = {}
    for stage, blocks in enumerate(BLOCKS[depth], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            s = 2 if stage > 1 and b == 0 else 1
            y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], s, 1), sd, f"{p}.bn1"))
            y = np_bn(np_conv(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], s, 0), sd, f"{p}.downsample.1")
            x = relu(y + x)
        features[f"C{stage + 1}"] = x
    return features


# Tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("binary", [False, True])
def test_every_backbone_tensor_mapped_exactly_once(depth, binary):
    sd = torchvision_state_dict(depth)
    _, variables = backbone_variables(depth, binary)
    loaded, report = pretrained.load_torchvision_resnet(
        variables, sd, depth=depth, binary=binary, source="sd"
    )
    used = [k for k in sd if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))]
    assert len(report.loaded) == len(set(report.loaded)) == len(used)
    assert sorted(report.skipped) == sorted(set(sd) - set(used))
    # Every tensor is distinct random data: each one must appear at exactly one place.
    by_value = {np.asarray(v).tobytes(): k for k, v in flat(loaded).items()}
    for name in used:
        value = sd[name]
        value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
        assert value.astype(np.float32).tobytes() in by_value, name
    leaves = flat(variables)
    if not binary:
        assert len(report.loaded) == len(leaves)
        assert not report.initialised and not report.derived
    else:
        binary_convs = [p for p in leaves if p.endswith("/conv/alpha")]
        assert len(binary_convs) == 2 * sum(BLOCKS[depth])
        assert sorted(report.derived) == sorted(binary_convs)
        for path in binary_convs:
            kernel = flat(loaded)[path[: -len("alpha")] + "kernel"]
            np.testing.assert_allclose(
                flat(loaded)[path], np.abs(kernel).mean(axis=(0, 1, 2)), rtol=1e-6
            )
        assert {p.split("/")[-2] for p in report.initialised} == {"bias", "act"}
        assert len(report.loaded) + len(report.derived) + len(report.initialised) == len(leaves)


def test_real_backbone_computes_torchvision_features():
    sd = torchvision_state_dict(18, seed=1)
    model, variables = backbone_variables(18, binary=False, size=64)
    loaded, _ = pretrained.load_torchvision_resnet(variables, sd, depth=18, binary=False)
    image = np.random.default_rng(2).normal(size=(64, 64, 3)).astype(np.float32)
    ours = model.apply(loaded, image[None], train=False)
    reference = np_resnet(image.astype(np.float64), sd, 18)
    for name, expected in reference.items():
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            np.asarray(ours[name][0]), expected, atol=1e-4 * scale, err_msg=name
        )


def test_strided_conv_pads_like_torchvision():
    """A stride-2 3x3 conv on an even-sized map pads (1, 1) as torch does, real and 1-bit."""
    x = np.random.default_rng(3).normal(size=(1, 8, 8, 4)).astype(np.float32)
    for spec in (BinarySpec(), BinarySpec(enabled=True, learnable_bias=False, scale="none")):
        unit = ConvUnit(5, 3, 2, spec, norm="none", shortcut=False)
        variables = unit.init(jax.random.key(0), x, train=False)
        _, captured = unit.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        y = np.asarray(captured["intermediates"]["conv"]["__call__"][0])[0]
        conv = variables["params"]["conv"]
        kernel = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)  # torch layout
        if spec.enabled:  # sign(x) (*) sign(w), zero padding (pad_value 0)
            signs = np.where(x[0] > 0, 1.0, -1.0), np.where(kernel > 0, 1.0, -1.0)
            expected = np_conv(*signs, 2, 1)
        else:
            expected = np_conv(x[0], kernel, 2, 1) + np.asarray(conv.get("bias", 0.0))
        assert y.shape == (4, 4, 5)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_shape_and_name_mismatches_are_errors():
    sd = torchvision_state_dict(18)
    _, narrow = backbone_variables(18, binary=False, width=16)
    with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(7, 7, 3, 64\)"):
        pretrained.load_torchvision_resnet(narrow, sd, depth=18, binary=False)
    _, variables = backbone_variables(18, binary=False)
    with pytest.raises(ValueError, match="'layer5.0.conv1.weight' is not a tensor"):
        pretrained.load_torchvision_resnet(
            variables, {**sd, "layer5.0.conv1.weight": sd["conv1.weight"]}, depth=18, binary=False
        )
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError, match="no 'layer3.1.bn2.running_var'"):
        pretrained.load_torchvision_resnet(variables, missing, depth=18, binary=False)
    with pytest.raises(
        ValueError, match="layer1.2.bn1.bias. is not a tensor of torchvision.s ResNet-18"
    ):
        pretrained.load_torchvision_resnet(
            variables, torchvision_state_dict(34), depth=18, binary=False
        )


def test_read_state_dict_formats(tmp_path, monkeypatch):
    import safetensors.numpy

    sd = {"conv1.weight": np.ones((2, 3, 7, 7), np.float32), "bn1.bias": np.arange(2.0)}
    safetensors.numpy.save_file(sd, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **sd)
    for name in ("w.safetensors", "w.npz"):
        read = pretrained.read_state_dict(str(tmp_path / name))
        assert sorted(read) == sorted(sd)
        np.testing.assert_array_equal(read["bn1.bias"], sd["bn1.bias"])
    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ValueError, match="safetensors.numpy as st"):
        pretrained.read_state_dict(str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        pretrained.read_state_dict(str(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="unknown format '.ckpt'"):
        (tmp_path / "w.ckpt").write_bytes(b"")
        pretrained.read_state_dict(str(tmp_path / "w.ckpt"))


def test_transfer_matching_real_into_binary():
    _, real = backbone_variables(18, binary=False, width=8)
    _, binary = backbone_variables(18, binary=True, width=8)
    real = jax.tree.map(lambda v: v + 1.0, real)  # distinguishable from the init
    moved, report = pretrained.transfer_matching(binary, real, source_name="real run")
    src, dst, before = flat(real), flat(moved), flat(binary)
    assert report.loaded and len(report.loaded) + len(report.skipped) == len(src)
    for path in report.loaded:
        np.testing.assert_array_equal(dst[path], src[path])
    for path in before:
        if path not in report.loaded and path not in report.derived:
            np.testing.assert_array_equal(dst[path], before[path])
            assert path in report.initialised
    assert report.derived  # alphas of the copied stage kernels
    # The real blocks' shortcut sits on the block, the 1-bit one's on unit1: not copied.
    assert any(s.startswith("params/stage2_block1/shortcut_conv/kernel") for s in report.skipped)
