"""Backbone, FPN, FCOS head, DFR decoder and the family registry: sizes, which layers are binary,
shapes, registration."""

import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import smoke

from dfrdet_jax import checkpointing, steps
from dfrdet_jax import layers as layers_lib
from dfrdet_jax.models import registry
from dfrdet_jax.models.common import BinarySpec, ConvUnit
from dfrdet_jax.models.decoder import Deconv2x, DFRDecoder, pixel_shuffle
from dfrdet_jax.models.detectors import Detector, normalize_images
from dfrdet_jax.models.fpn import FPN, upsample_nearest_to
from dfrdet_jax.models.heads import family, single_stage
from dfrdet_jax.models.heads import fcos as fcos_head
from dfrdet_jax.models.resnet import ResNet

BINARY = BinarySpec(enabled=True)


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (34, 21_284_672)])
def test_real_resnet_parameter_count_matches_the_standard_network(depth, expected):
    # torchvision resnet18/34 without the 1000-way classifier (512 * 1000 + 1000 parameters).
    shapes = jax.eval_shape(
        lambda: ResNet(depth).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    assert _count(shapes["params"]) == expected


def test_binary_resnet_keeps_stem_and_shortcuts_real():
    shapes = jax.eval_shape(
        lambda: ResNet(18, width=8, binary=BINARY).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False
        )
    )
    flat = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
    binary_convs = {k.rsplit("/", 1)[0] for k in flat if k.endswith("conv/alpha")}
    kernels = {k.rsplit("/", 1)[0] for k in flat if k.endswith("kernel")}
    # 8 blocks x 2 binary 3x3 units; the stem and 3 downsampling shortcuts are real.
    assert len(binary_convs) == 16
    assert all("/unit" in k for k in binary_convs)
    real = kernels - binary_convs
    assert real == {"stem_conv"} | {f"stage{s}_block1/unit1/shortcut_conv" for s in (2, 3, 4)}
    assert flat["stem_conv/kernel"].shape == (7, 7, 3, 8)


def _tiny_fcos(binary=BINARY, decoder_levels=(2, 3, 4)):
    head = fcos_head.FCOSHead(3, (4, 8, 16, 32, 64), width=16, num_convs=1, binary=binary)
    return Detector(
        head=head,
        backbone_width=8,
        fpn_width=16,
        backbone_binary=binary,
        neck_binary=binary,
        decoder_levels=decoder_levels,
        decoder_width=8,
        decoder_blocks=1,
    )


def test_fcos_outputs_cover_every_level_point():
    model = _tiny_fcos()
    x = jnp.zeros((2, 64, 128, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    sizes = single_stage.feature_sizes((64, 128), model.strides)
    assert sizes == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    points = sum(h * w for h, w in sizes)
    assert out["cls_logits"].shape == (2, points, 3)
    assert out["ltrb"].shape == (2, points, 4)
    assert out["centerness"].shape == (2, points)
    assert "reconstruction" not in out
    assert bool(jnp.all(out["ltrb"] >= 0))


@pytest.mark.slow
def test_decoder_reconstructs_input_shape_and_is_absent_from_inference():
    model = _tiny_fcos()
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=True, reconstruct=True))()
    assert "decoder" in variables["params"]
    out, _ = jax.jit(
        lambda v: model.apply(v, x, train=True, reconstruct=True, mutable=["batch_stats", "losses"])
    )(variables)
    assert out["reconstruction"].shape == x.shape
    # Inference runs without any decoder parameter: it never touches the decoder.
    inference_params = {k: v for k, v in variables["params"].items() if k != "decoder"}
    out_inference = jax.jit(lambda v: model.apply(v, x, train=False))(
        {"params": inference_params, "batch_stats": variables["batch_stats"]}
    )
    assert "reconstruction" not in out_inference
    with pytest.raises(flax.errors.ScopeParamNotFoundError):
        jax.eval_shape(
            lambda v: model.apply(v, x, train=False, reconstruct=True),
            {"params": inference_params, "batch_stats": variables["batch_stats"]},
        )


def test_decoder_rejects_levels_outside_the_pyramid():
    model = _tiny_fcos(decoder_levels=(1, 2))
    with pytest.raises(ValueError, match=r"decoder levels \[1\]"):
        jax.eval_shape(
            lambda: model.init(
                jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=True, reconstruct=True
            )
        )


@pytest.mark.parametrize("hw", [(72, 88), (50, 37)])
def test_any_input_size_gives_ceil_sized_levels(hw):
    # 800 px (AI-TOD) is no multiple of P6's stride 64; odd sides exercise every ceil.
    model = _tiny_fcos()
    images = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    outputs, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), images
    )
    sizes = single_stage.feature_sizes(hw, model.strides)
    assert sizes[0] == (-(-hw[0] // 4), -(-hw[1] // 4)) and sizes[-1][0] == 1 + (hw[0] > 64)
    assert outputs["cls_logits"].shape[1] == sum(h * w for h, w in sizes)


@pytest.mark.parametrize("hw", [(3, 5), (4, 4)])
def test_deconv2x_is_flax_conv_transpose(hw):
    """The decoder's 2x up-sampling is nn.ConvTranspose(features, (2, 2), strides=(2, 2)): the
    same parameters from the same key, the same output and the same gradients (kernel, bias,
    input), computed as a matmul instead of a dilated convolution."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, *hw, 6)).astype(np.float32))
    ours, flax_deconv = Deconv2x(5), flax.linen.ConvTranspose(5, (2, 2), strides=(2, 2))
    params = ours.init(jax.random.key(1), x)
    reference = flax_deconv.init(jax.random.key(1), x)
    assert _shapes(params) == _shapes(reference)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = jax.tree.map(lambda v: v + 0.1, params)  # a non-zero bias
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, 2 * hw[0], 2 * hw[1], 5)))

    def objective(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * weights)

    y, want = ours.apply(params, x), flax_deconv.apply(params, x)
    assert y.shape == (2, 2 * hw[0], 2 * hw[1], 5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    got = jax.grad(objective(ours), argnums=(0, 1))(params, x)
    expected = jax.grad(objective(flax_deconv), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family_name", ["fcos", "retinanet", "faster_rcnn"])
def test_shared_heads_count_each_binary_kernel_once_in_l_r(smoke_config, make_batch, family_name):
    """The heads run once per pyramid level, yet the total L_R is Eq. 3's sum over layers:
    0.5 * ||w - |alpha| * sign(w)||^2 of every learned-scale kernel in the parameters, once."""
    config = smoke_config("bnn", family=family_name)
    model = registry.build_model(config, num_classes=3)
    batch = jax.tree.map(jnp.asarray, make_batch(batch_size=1, size=64))
    images = normalize_images(batch["image"])
    # Compiled whole: op by op, Faster R-CNN's proposals take seconds per op shape.
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    extra = registry.apply_kwargs(config, batch, train=True, rng=jax.random.key(1))
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats", "losses"])
    _, state = jax.jit(apply)(variables, images, **extra)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    expected, layers_with_scale = 0.0, 0
    for path, alpha in flat.items():
        if path[-1] == "alpha":
            w = np.asarray(flat[(*path[:-1], "kernel")], np.float64)
            sign = np.where(w > 0, 1.0, -1.0)
            expected += 0.5 * np.sum((w - np.abs(np.asarray(alpha)) * sign) ** 2)
            layers_with_scale += 1
    assert len(jax.tree.leaves(state["losses"])) == layers_with_scale > 0
    total = float(layers_lib.total_reconstruction_loss(state["losses"]))
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_pixel_shuffle_matches_index_definition():
    r, c = 4, 3
    x = np.arange(2 * 2 * 3 * c * r * r, dtype=np.float32).reshape(2, 2, 3, c * r * r)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), r))
    assert y.shape == (2, 8, 12, c)
    for b, i, j, ch, di, dj in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 2, 3, 1), (0, 1, 0, 1, 2, 3)]:
        assert y[b, i * r + di, j * r + dj, ch] == x[b, i, j, ch * r * r + di * r + dj]


def _decoder_shapes(num_levels, channels, width, blocks):
    """The decoder's parameter shapes: a 2x2 deconv per level, then the same stage for any set
    of levels (1x1 fuse, residual blocks, 1x1 projection to 3 x 4 x 4 for a 4x4 pixel shuffle)."""
    shapes = {}
    for i in range(num_levels):
        shapes.update({f"deconv{i}/kernel": (2, 2, channels, width), f"deconv{i}/bias": (width,)})
    shapes.update({"fuse/kernel": (1, 1, width * num_levels, width), "fuse/bias": (width,)})
    for j, k in itertools.product(range(blocks), (1, 2)):
        shapes.update({f"block{j}/conv{k}/kernel": (3, 3, width, width)})
        shapes.update({f"block{j}/conv{k}/bias": (width,)})
    shapes.update({"project/kernel": (1, 1, width, 48), "project/bias": (48,)})
    return shapes


def _shapes(params):
    return {k: v.shape for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def _reference_decoder(params, levels, image_hw):
    """The decoder with P2 among its levels, written out: each level 2x up by its transposed conv
    (output pixel (2i + a, 2j + b) = input (i, j) times the kernel tap (1 - a, 1 - b)), resized
    bilinearly to P2's H/4 x W/4 grid, concatenated, fused, refined, projected and 4x4
    pixel-shuffled."""

    def conv(x, p):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=dims)

    h, w = image_hw
    merged = []
    for i, x in enumerate(levels):
        p = params[f"deconv{i}"]
        b, lh, lw, _ = x.shape
        up = jnp.einsum("bhwk,acko->bhawco", x, p["kernel"][::-1, ::-1])
        up = up.reshape(b, 2 * lh, 2 * lw, -1) + p["bias"]
        merged.append(jax.image.resize(up, (b, h // 4, w // 4, up.shape[-1]), "bilinear"))
    x = conv(jnp.concatenate(merged, -1), params["fuse"]) + params["fuse"]["bias"]
    for j in range(sum(name.startswith("block") for name in params)):
        block = params[f"block{j}"]
        y = jax.nn.relu(conv(x, block["conv1"]) + block["conv1"]["bias"])
        x = x + conv(y, block["conv2"]) + block["conv2"]["bias"]
    x = conv(x, params["project"]) + params["project"]["bias"]  # [B, H/4, W/4, 3 * 4 * 4]
    x = x.reshape(x.shape[0], h // 4, w // 4, 3, 4, 4)  # channel (c, i, j) -> sub-pixel (i, j)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(x.shape[0], h, w, 3)


def _smoke_p2_p6(smoke_config, load_config, levels, mode="decoupled"):
    """The smoke 1-bit DFR FCOS on P2-P6 (smoke has P2-P4) decoding ``levels`` with ``mode``."""
    config = smoke_config("dfr")
    config.model.max_level = 6
    config.fcos.regress_ranges = load_config("synthetic,dfr").fcos.regress_ranges
    config.dfr.levels, config.dfr.mode = levels, mode
    return config


@pytest.mark.parametrize("levels", [(2, 3, 4), (2, 6)])  # the default set; one with a gap
def test_decoder_with_p2_keeps_its_construction(smoke_config, load_config, make_batch, levels):
    # Sets with P2 merged on P2's grid before the grid was fixed at stride 4: nothing changes.
    config = _smoke_p2_p6(smoke_config, load_config, levels)
    model = registry.build_model(config, num_classes=3)
    images = normalize_images(jnp.asarray(make_batch(size=72)["image"]))
    # Under jit: op by op, every operation would compile alone.
    variables = jax.jit(functools.partial(model.init, train=False, reconstruct=True))(
        jax.random.key(0), images
    )
    apply = functools.partial(model.apply, train=False, reconstruct=True, features=True)
    out = jax.jit(apply)(variables, images)
    params = variables["params"]["decoder"]
    assert _shapes(params) == _decoder_shapes(len(levels), 16, 8, 1)
    expected = _reference_decoder(params, [out["features"][v - 2] for v in levels], (72, 72))
    np.testing.assert_allclose(out["reconstruction"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(800, 800), (50, 37)])
def test_every_level_subset_builds_the_same_output_stage(smoke_config, load_config, hw):
    # AI-TOD's 800 px is no multiple of 64, (50, 37) not even of 4: every level subset of P2-P6
    # (Table 1's rows among them) still merges on the stride-4 grid, into the same output stage.
    # The detector is traced once for its P2-P6 maps at this size; the decoder, the only part a
    # level subset changes, once per subset (the whole detector builds with a subset in the
    # tests below and above).
    config = _smoke_p2_p6(smoke_config, load_config, (2,))
    model = registry.build_model(config, 3)
    images = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
    out, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False, features=True),
        images,
    )
    pyramid = dict(zip(range(2, 7), out["features"], strict=True))
    decoder = DFRDecoder(config.dfr.decoder_width, config.dfr.decoder_blocks)
    for levels in (s for n in range(1, 6) for s in itertools.combinations(range(2, 7), n)):
        reconstruction, variables = jax.eval_shape(
            lambda maps: decoder.init_with_output(jax.random.key(0), maps, hw),
            [pyramid[v] for v in levels],
        )
        assert reconstruction.shape == (2, *hw, 3), levels
        assert _shapes(variables["params"]) == _decoder_shapes(len(levels), 16, 8, 1)


# The decoder's shape for every level subset is checked above; here a loss and its gradients at
# 100 px for the coarsest single level and a subset with a gap (the loss modes are pure loss
# math, tested in test_losses_dfr.py).
TABLE1_ROWS = [
    ((6,), "decoupled"),  # the quick run's (-m "not slow") one: P6's stride is 64
    pytest.param((2, 3, 6), "full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("levels", "mode"), TABLE1_ROWS)
def test_every_table1_row_trains_at_a_size_no_multiple_of_64(
    smoke_config, load_config, make_batch, levels, mode
):
    config = _smoke_p2_p6(smoke_config, load_config, levels, mode)
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (100, 100), 1)
    grad_fn = functools.partial(steps.loss_and_metrics, model=model, config=config)
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(grad_fn, has_aux=True))(
        state.params, state.batch_stats, make_batch(size=100), jax.random.key(1)
    )
    assert np.isfinite(float(loss)) and float(metrics["loss_dfr"]) > 0
    decoder_grads = jax.tree.leaves(grads["decoder"])
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in decoder_grads)


@pytest.mark.parametrize("score_mode", ["mmdet", "torchvision"])
def test_postprocess_decodes_and_clips_the_best_point(score_mode):
    strides = (4, 8)
    sizes = single_stage.feature_sizes((16, 16), strides)
    num_points = sum(h * w for h, w in sizes)
    cls = jnp.full((1, num_points, 2), -10.0)
    ltrb = jnp.zeros((1, num_points, 4))
    ctr = jnp.full((1, num_points), 10.0)
    # Point 5 of level 0 is at cell (row 1, col 1): centre (6, 6) px.
    cls = cls.at[0, 5, 1].set(10.0)
    ltrb = ltrb.at[0, 5].set(jnp.array([2.0, 3.0, 20.0, 4.0]))
    dets = fcos_head.fcos_postprocess(
        {"cls_logits": cls, "ltrb": ltrb, "centerness": ctr},
        jnp.array([[16, 12]]),
        input_hw=(16, 16),
        strides=strides,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=4,
        pre_nms_top_k=10,
        score_mode=score_mode,
    )
    assert int(dets.valid.sum()) == 1
    np.testing.assert_allclose(np.asarray(dets.boxes[0, 0]), [4.0, 3.0, 12.0, 10.0])  # x2 clipped
    assert int(dets.classes[0, 0]) == 1
    cls_times_ctr = (1 / (1 + np.exp(-10.0))) ** 2
    expected_score = cls_times_ctr if score_mode == "mmdet" else np.sqrt(cls_times_ctr)
    np.testing.assert_allclose(float(dets.scores[0, 0]), expected_score, rtol=1e-6)


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_fcos_score_modes_keep_different_detections():
    """Threshold 0.3, three far-apart points (s = class score, c = centerness):
      A: s 0.5,  c 0.1  mmdet keeps it (0.5 > 0.3) at 0.05;   torchvision drops sqrt(0.05) = 0.22
      B: s 0.25, c 1    mmdet drops it (0.25 <= 0.3);         torchvision keeps sqrt(0.25) = 0.5
      C: s 0.8,  c 0.8  both keep it: mmdet at 0.64,          torchvision at 0.8
    mmdetection scores s * c after thresholding s; torchvision thresholds and scores sqrt(s * c).
    """
    strides = (4, 8)
    sizes = single_stage.feature_sizes((16, 16), strides)
    num_points = sum(h * w for h, w in sizes)  # 16 + 4; level 0 points 0, 3, 15: far apart
    cls = np.full((1, num_points, 2), -20.0, np.float32)
    ctr = np.full((1, num_points), -20.0, np.float32)
    points = {"A": (0, 0, 0.5, 0.1), "B": (3, 1, 0.25, 1.0), "C": (15, 0, 0.8, 0.8)}
    for point, cls_index, s, c in points.values():
        cls[0, point, cls_index] = _logit(s)
        ctr[0, point] = 30.0 if c == 1.0 else _logit(c)
    outputs = {
        "cls_logits": jnp.asarray(cls),
        "ltrb": jnp.ones((1, num_points, 4)),
        "centerness": jnp.asarray(ctr),
    }
    sigmoid = lambda v: 1 / (1 + np.exp(-np.float64(v)))  # noqa: E731
    kept = {}
    for mode in fcos_head.SCORE_MODES:
        dets = fcos_head.fcos_postprocess(
            outputs,
            jnp.array([[16, 16]]),
            input_hw=(16, 16),
            strides=strides,
            score_threshold=0.3,
            iou_threshold=0.5,
            max_detections=5,
            pre_nms_top_k=40,
            score_mode=mode,
        )
        n = int(dets.valid.sum())
        assert not np.any(np.asarray(dets.valid[0, n:]))
        kept[mode] = (np.asarray(dets.scores[0, :n]), np.asarray(dets.classes[0, :n]))
        centres = (np.asarray(dets.boxes[0, :n, :2]) + np.asarray(dets.boxes[0, :n, 2:])) / 2
        names = "CA" if mode == "mmdet" else "CB"
        expected_centres = {"A": (2.0, 2.0), "B": (14.0, 2.0), "C": (14.0, 14.0)}
        np.testing.assert_allclose(centres, [expected_centres[k] for k in names])
        np.testing.assert_array_equal(kept[mode][1], [points[k][1] for k in names])
    # Exactly the expected scores, from the same float32 logits: s * c or sqrt(s * c).
    s_c = {
        k: sigmoid(cls[0, point, cls_index]) * sigmoid(ctr[0, point])
        for k, (point, cls_index, _, _) in points.items()
    }
    np.testing.assert_allclose(kept["mmdet"][0], [s_c["C"], s_c["A"]], rtol=1e-6)
    np.testing.assert_allclose(kept["mmdet"][0], [0.64, 0.05], rtol=1e-5)
    np.testing.assert_allclose(kept["torchvision"][0], np.sqrt([s_c["C"], s_c["B"]]), rtol=1e-6)
    np.testing.assert_allclose(kept["torchvision"][0], [0.8, 0.5], rtol=1e-5)


def test_fcos_score_mode_is_checked():
    with pytest.raises(ValueError, match=r"Unknown config.fcos.score_mode 'sqrt'.*mmdet"):
        fcos_head.fcos_postprocess(
            {
                "cls_logits": jnp.zeros((1, 20, 2)),
                "ltrb": jnp.zeros((1, 20, 4)),
                "centerness": jnp.zeros((1, 20)),
            },
            jnp.array([[16, 16]]),
            input_hw=(16, 16),
            strides=(4, 8),
            score_threshold=0.05,
            iou_threshold=0.5,
            max_detections=4,
            pre_nms_top_k=10,
            score_mode="sqrt",
        )


@pytest.mark.parametrize("activation", fcos_head.BOX_ACTIVATIONS)
def test_fcos_box_distances_and_their_gradients_match_numpy(activation):
    t = np.array([[-3.0, -0.5, 0.0, 0.7], [1.5, 2.0, 9.0, -20.0]], np.float32)
    scale, stride = np.float32(1.3), 8
    x = scale * t
    if activation == "relu":
        expected = np.maximum(x, 0) * stride
        d_expected = np.where(x > 0, scale * stride, 0.0)  # no gradient below 0: a dead unit
    else:
        capped = np.minimum(x, fcos_head.EXP_BOX_MAX_EXPONENT)
        expected = np.exp(capped) * stride
        d_expected = np.where(x < fcos_head.EXP_BOX_MAX_EXPONENT, scale * expected, 0.0)
    distances = fcos_head.box_distances(jnp.asarray(t), scale, stride, activation)
    np.testing.assert_allclose(distances, expected, rtol=1e-6)
    d_t = jax.grad(lambda t: fcos_head.box_distances(t, scale, stride, activation).sum())(t)
    np.testing.assert_allclose(d_t, d_expected, rtol=1e-5)
    assert np.all(np.isfinite(distances)) and np.all(distances >= 0)
    if activation == "exp":  # every output below the cap keeps a gradient, negatives included
        assert np.all(d_t[t < 0] > 0)


def test_fcos_config_chooses_the_box_activation(smoke_config):
    config = smoke_config("bnn")
    assert registry.build_model(config, num_classes=3).head.box_activation == "relu"
    config.fcos.box_activation = "exp"
    assert registry.build_model(config, num_classes=3).head.box_activation == "exp"


def test_upsample_nearest_to_an_odd_size_repeats_and_crops():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    y = np.asarray(upsample_nearest_to(jnp.asarray(x), (3, 5)))
    expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, :3, :5]
    np.testing.assert_array_equal(y, expected)
    assert y[0, 2, 4, 0] == x[0, 1, 2, 0]


def _max_pool(x, kernel, stride):
    """numpy max pool of [B, H, W, C], no padding."""
    rows, cols = (x.shape[1] - kernel) // stride + 1, (x.shape[2] - kernel) // stride + 1
    out = np.empty((x.shape[0], rows, cols, x.shape[3]), x.dtype)
    for i, j in itertools.product(range(rows), range(cols)):
        window = x[:, i * stride : i * stride + kernel, j * stride : j * stride + kernel]
        out[:, i, j] = window.max(axis=(1, 2))
    return out


def test_maxpool_p6_and_p7_are_max_pools_of_the_level_below():
    # Odd sides: a kernel-1 stride-2 pool gives ceil(h / 2), as the stride-2 convs do.
    sizes = {2: (19, 13), 3: (10, 7), 4: (5, 4), 5: (3, 2)}
    features = {
        f"C{v}": jax.random.normal(jax.random.key(v), (2, *hw, 4 * 2**v)) for v, hw in sizes.items()
    }
    fpn = FPN(width=4, max_level=7, p6_source="maxpool")
    init = jax.jit(functools.partial(fpn.init_with_output, train=False))  # one program
    out, variables = init(jax.random.key(0), features)
    assert not any(name.startswith("extra") for name in variables["params"])
    for level in (6, 7):
        below = np.asarray(out[f"P{level - 1}"])
        np.testing.assert_array_equal(out[f"P{level}"], _max_pool(below, kernel=1, stride=2))
    assert out["P7"].shape == (2, 1, 1, 4)


@pytest.mark.parametrize(
    ("name", "extra6"),
    [("fcos", (3, 3, 256, 256)), ("retinanet", (3, 3, 512, 256)), ("faster_rcnn", None)],
)
def test_each_family_builds_p6_as_mmdetection(load_config, name, extra6):
    # FCOS: a stride-2 conv on P5 (256 channels); RetinaNet: on ResNet-18's C5 (512 channels);
    # Faster R-CNN: P5 max-pooled, no parameters.
    model = registry.build_model(load_config("synthetic,real", name), num_classes=3)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=False)
    )
    neck = _shapes(shapes["params"]["neck"])
    expected = {} if extra6 is None else {"extra6/conv/kernel": extra6, "extra6/conv/bias": (256,)}
    assert {k: v for k, v in neck.items() if k.startswith("extra")} == expected


def test_unknown_p6_source_lists_the_valid_ones(load_config):
    config = load_config("synthetic,real", "retinanet")
    config.model.p6_source = "c4"
    with pytest.raises(
        ValueError, match=r"p6_source 'c4'; valid choices: \['p5', 'c5', 'maxpool'\]"
    ):
        registry.validate_config(config)


def test_every_family_is_registered_once_by_its_config_name():
    assert set(family.FAMILIES) == {"fcos", "retinanet", "faster_rcnn"}
    assert [name for name, f in family.FAMILIES.items() if f.needs_targets] == ["faster_rcnn"]
    with pytest.raises(KeyError, match="'fcos' is already registered"):
        family.register("fcos", family.FAMILIES["fcos"])


def test_unknown_family_lists_the_registered_ones(monkeypatch):
    for name in list(family.FAMILIES):  # an isolated table, restored after the test
        monkeypatch.delitem(family.FAMILIES, name)
    toy = family.DetectorFamily(
        build_head=lambda config, num_classes, binary, dtype: None,
        loss=lambda config, outputs, batch: {},
        postprocess=lambda config, outputs, batch: None,
        validate=lambda config: None,
    )
    family.register("toy", toy)
    config = ml_collections.ConfigDict({"model": {"name": "fcos"}})
    with pytest.raises(ValueError, match=r"valid choices: \['toy'\]"):
        registry.family(config)
    config.model.name = "toy"
    with pytest.raises(ValueError, match="needs a config.toy section"):
        registry.family(config)
    config.toy = {}
    assert registry.family(config) is toy


@pytest.mark.parametrize(
    "parts, input_norm, drowned",
    [
        (("backbone", "head"), False, True),  # a real FPN under a 1-bit head: warned
        (("backbone", "head"), True, False),
        (("backbone", "neck", "head"), False, False),  # 1-bit levels: the branch weighs ~1
        (("backbone",), False, False),  # a real head has no binary branch
        ((), False, False),
    ],
)
def test_a_1bit_head_on_unnormalised_real_levels_is_recognised(
    load_config, parts, input_norm, drowned
):
    config = load_config("synthetic,bnn,demo")
    config.model.binary_parts, config.model.head_input_norm = parts, input_norm
    assert registry.head_drowned_by_real_levels(config) is drowned


@pytest.mark.parametrize("family_name", ["fcos", "retinanet", "faster_rcnn"])
def test_head_input_norm_makes_the_1bit_head_blind_to_the_levels_scale(load_config, family_name):
    """With ``head_input_norm`` one GroupNorm, shared by the levels, sees each level first, so
    scaling every level (a real FPN's RMS is about 14) leaves the outputs as they are (Faster
    R-CNN's proposals and RoI predictions included); without it the scale reaches the 1-bit
    units' shortcuts (the towers', the RPN conv's) and the outputs move."""
    config = load_config("synthetic,bnn,smoke", family_name)
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(rng.normal(size=(2, s, s, 16)), jnp.float32) for s in (8, 4, 2)]
    for input_norm in (True, False):
        config.model.head_input_norm = input_norm
        head = family.FAMILIES[family_name].build_head(config, 3, BINARY, None)
        variables = jax.jit(functools.partial(head.init, train=False))(jax.random.key(0), levels)
        norms = {k for k in flax.traverse_util.flatten_dict(variables["params"]) if "norm" in k[0]}
        assert norms == ({("input_norm", "scale"), ("input_norm", "bias")} if input_norm else set())
        apply = jax.jit(functools.partial(head.apply, train=False))
        outputs = apply(variables, levels)
        scaled = apply(variables, [7.0 * x for x in levels])
        moved = max(
            float(jnp.max(jnp.abs(jnp.float32(outputs[k]) - jnp.float32(scaled[k]))))
            for k in outputs
        )
        assert (moved < 1e-4) if input_norm else (moved > 1e-2), (input_norm, moved)


@pytest.mark.parametrize("family_name", ["fcos", "retinanet", "faster_rcnn"])
def test_head_width_sets_the_towers_channels(load_config, family_name):
    """``head_width`` widens the towers (the RPN conv) past the FPN's 16 channels: the 1-bit
    first unit maps 16 -> 24 with a real 1x1 shortcut conv, later units keep 24 and add their
    input, and the prediction convs read 24; 0 keeps the FPN width, with no shortcut conv."""
    config = load_config("synthetic,bnn,smoke", family_name)
    config.model.head_convs = 2
    levels = [jnp.ones((1, s, s, 16), jnp.float32) for s in (8, 4, 2)]
    first = "rpn/rpn_conv0" if family_name == "faster_rcnn" else "cls_tower0"
    for width, channels in ((0, 16), (24, 24)):
        config.model.head_width = width
        head = family.FAMILIES[family_name].build_head(config, 3, BINARY, None)
        shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), levels, train=False))
        flat = checkpointing.tree_shapes(shapes["params"])
        assert flat[f"{first}/conv/kernel"] == (3, 3, 16, channels)
        assert (f"{first}/shortcut_conv/kernel" in flat) is (width > 0)
        if width:
            assert flat[f"{first}/shortcut_conv/kernel"] == (1, 1, 16, 24)
        if family_name != "faster_rcnn":
            assert flat["cls_tower1/conv/kernel"] == (3, 3, channels, channels)
            assert "cls_tower1/shortcut_conv/kernel" not in flat
            assert flat["cls_logits/kernel"][2] == flat["bbox_pred/kernel"][2] == channels
        else:
            assert flat["rpn/rpn_logits/kernel"][2] == channels
    config.model.head_width = -8
    with pytest.raises(ValueError, match="head_width must be >= 0"):
        registry.validate_config(config)


@pytest.mark.parametrize("family_name", ["fcos", "retinanet", "faster_rcnn"])
def test_head_level_norms_give_each_level_its_own_norms_and_share_the_convs(
    load_config, family_name
):
    """``head_level_norms``: each tower unit (the RPN conv) keeps its norms once per level,
    'norm_level{i}' and 'shortcut_norm_level{i}', in place of the shared 'norm' and
    'shortcut_norm', and nothing else changes. With every level's norms set to the shared
    head's, the two heads compute the same outputs; changing level 1's norms moves the
    predictions of level 1's locations only."""
    config = load_config("synthetic,bnn,smoke", family_name)
    config.model.head_width = 24  # the first unit gets a shortcut conv, with its norm
    sides = (8, 4, 2)
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(rng.normal(size=(2, s, s, 16)), jnp.float32) for s in sides]
    params, apply = {}, {}
    for level_norms in (False, True):
        config.model.head_level_norms = level_norms
        head = family.FAMILIES[family_name].build_head(config, 3, BINARY, None)
        variables = jax.jit(functools.partial(head.init, train=False))(jax.random.key(0), levels)
        params[level_norms] = flax.traverse_util.flatten_dict(variables["params"], sep="/")
        apply[level_norms] = jax.jit(
            lambda p, head=head: head.apply({"params": p}, levels, train=False)
        )

    def shared_name(name):  # '.../norm_level2/scale' -> '.../norm/scale'
        return "/".join(part.split("_level")[0] for part in name.split("/"))

    per_level = [k for k in params[True] if "_level" in k]
    tower_norms = {shared_name(k) for k in per_level}
    first = "rpn/rpn_conv0" if family_name == "faster_rcnn" else "cls_tower0"
    assert {f"{first}/norm/scale", f"{first}/shortcut_norm/scale"} <= tower_norms
    assert len(per_level) == len(sides) * len(tower_norms)
    assert {shared_name(k) for k in params[True]} == set(params[False])

    copied = {k: params[False][shared_name(k)] for k in params[True]}
    unflat = functools.partial(flax.traverse_util.unflatten_dict, sep="/")
    expected = apply[False](unflat(params[False]))
    got = apply[True](unflat(copied))
    for key in expected:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(expected[key]), atol=1e-6)

    moved = dict(copied)
    for k in per_level:
        if "_level1/" in k:
            moved[k] = copied[k] * 1.5 + 0.3
    logits = "rpn_logits" if family_name == "faster_rcnn" else "cls_logits"
    before = np.asarray(got[logits])
    after = np.asarray(apply[True](unflat(moved))[logits])
    per_cell = before.shape[1] // sum(s * s for s in sides)
    ends = np.cumsum([0] + [per_cell * s * s for s in sides])
    changed = [
        float(np.max(np.abs(after[:, a:b] - before[:, a:b]))) for a, b in zip(ends[:-1], ends[1:])
    ]
    assert changed[0] == 0 and changed[2] == 0 and changed[1] > 1e-3, changed


def _assert_deferring_changes_nothing(module_of, inputs, weight_of):
    """``module_of(defer)`` applied to ``inputs`` (float64), deferring its activations or
    computing them, gives the same output and gradients (parameters and inputs) to 1e-12:
    the loss sum(output * weight_of(output)), with every parameter perturbed from its
    initialisation so that each one's gradient is exercised. Call under ``jax.enable_x64``."""

    def loss(params, inputs, defer):
        out, _ = module_of(defer).apply({"params": params}, inputs, mutable=["losses"])
        return jnp.sum(out * weight_of(out))

    @jax.jit  # one program: op by op, every operation would compile alone
    def computed_and_deferred(inputs):
        params = module_of(False).init(jax.random.key(0), inputs)["params"]
        params = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape, jnp.float64),
            params,
        )
        return [jax.value_and_grad(loss, (0, 1))(params, inputs, d) for d in (False, True)]

    want, got = computed_and_deferred(inputs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        BINARY,
        BinarySpec(enabled=True, activation="rprelu", input_quantizer="clipped"),
        BinarySpec(enabled=True, learnable_bias=False, pad_value=1.0),
        BinarySpec(enabled=True, bits=4),
    ],
)
def test_a_deferred_activation_gives_the_same_values_and_gradients(spec):
    """Two 1-bit units, the first handing its RPReLU on deferred (layers.Deferred, computed
    inside the second unit's binary conv and recomputed in its backward pass) or computed: the
    same output and gradients, in float64 to 1e-12 (the deferred path sums the RPReLU's two
    cotangents, shortcut and conv, after its derivative instead of before, so float32 rounds
    differently)."""

    class Pair(flax.linen.Module):
        defer: bool

        @flax.linen.compact
        def __call__(self, x):
            x = ConvUnit(8, binary=spec, norm="group", name="a")(
                x, True, defer_activation=self.defer
            )
            return ConvUnit(8, binary=spec, norm="group", name="b")(x, True)

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8), jnp.float64)
        g = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
        deferred = jax.eval_shape(
            lambda x: ConvUnit(8, binary=spec, norm="group").init_with_output(
                jax.random.key(0), x, True, defer_activation=True
            )[0],
            x,
        )
        assert isinstance(deferred, layers_lib.Deferred)
        _assert_deferring_changes_nothing(Pair, x, lambda out: g)


@pytest.mark.parametrize("p6_source", ["p5", "maxpool"])
def test_fpn_levels_handed_on_deferred_give_the_same_head_outputs_and_gradients(p6_source):
    """A 1-bit FPN whose output units hand their RPReLU on deferred to 1-bit towers
    (``FPN.defer_outputs``), or compute it: the same outputs and gradients, in float64 to
    1e-12 (as for two units above)."""

    class NeckAndHead(flax.linen.Module):
        defer: bool

        @flax.linen.compact
        def __call__(self, features):
            levels = FPN(8, 3, 6, p6_source, BINARY, defer_outputs=self.defer, name="neck")(
                features, True
            )
            levels = [levels[f"P{level}"] for level in range(3, 7)]
            if self.defer:
                assert isinstance(levels[0], layers_lib.Deferred)
            outputs = single_stage.tower_head(
                levels, True, num_classes=2, num_anchors=1, box_outputs={"box": 4}, width=8,
                num_convs=2, prior_prob=0.01, binary=BINARY, dtype=None,
            )  # fmt: skip
            return jnp.concatenate([jnp.concatenate(v, axis=1) for v in outputs.values()], -1)

    with jax.enable_x64(True):
        features = {
            f"C{level}": jax.random.normal(jax.random.key(level), (2, s, s, 4), jnp.float64)
            for level, s in ((3, 16), (4, 8), (5, 4))
        }
        _assert_deferring_changes_nothing(
            NeckAndHead, features, lambda out: jnp.cos(jnp.arange(out.size).reshape(out.shape))
        )


@pytest.mark.parametrize(
    ("family_name", "variant", "head_input_norm", "deferred"),
    [
        ("fcos", "bnn", False, True),
        ("retinanet", "dfr", False, True),
        ("fcos", "bnn", True, False),
        ("fcos", "real", False, False),
        ("faster_rcnn", "bnn", False, False),
    ],
)
def test_detectors_hand_the_fpn_levels_deferred_to_1bit_towers_only(
    family_name, variant, head_input_norm, deferred
):
    """The FPN's output activations go deferred to FCOS's and RetinaNet's 1-bit towers without
    a GroupNorm before them; every other head, the decoder and distillation's features get
    them computed, and the detector's outputs have the same shapes either way."""
    config = smoke.smoke_config(variant, family_name)
    config.model.head_input_norm = head_input_norm
    model = registry.build_model(config, num_classes=3)
    assert getattr(model.head, "takes_deferred_levels", False) is deferred
    if family_name == "faster_rcnn":
        return
    images = jnp.zeros((1, 64, 64, 3))
    out = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), images, False, reconstruct=variant == "dfr", features=True
        )[0]
    )
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in out["features"])
    if variant == "dfr":
        assert out["reconstruction"].shape == (1, 64, 64, 3)


def test_deferred_activations_keep_one_activation_less_per_1bit_unit():
    """XLA's buffers for the gradient of a tower of 1-bit units (GroupNorm, learned PReLU slopes
    and biases) grow by about one activation less per unit when each unit hands its RPReLU on
    deferred: the next unit's binary conv recomputes it from the RPReLU's input."""
    x = jnp.ones((1, 16, 16, 32))

    def per_unit(defer: bool):
        def build(depth):
            class Tower(flax.linen.Module):
                @flax.linen.compact
                def __call__(self, x):
                    for i in range(depth):
                        unit = ConvUnit(32, binary=BINARY, norm="group", name=f"unit{i}")
                        x = unit(x, True, defer_activation=defer and i < depth - 1)
                    return x

            def loss(params, x):
                return jnp.sum(Tower().apply({"params": params}, x, mutable=["losses"])[0] ** 2)

            return loss, Tower().init(jax.random.key(0), x)["params"]

        return smoke.temp_buffers_per_layer(build, x)

    deferred, computed = per_unit(True), per_unit(False)
    assert computed - deferred >= 0.75, (computed, deferred)
