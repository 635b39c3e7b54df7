"""Backbone, FPN, FCOS head, DFR decoder and the family registry: sizes, which layers are binary,
shapes, registration."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dfrdet_jax.models import registry
from dfrdet_jax.models.common import BinarySpec
from dfrdet_jax.models.decoder import DFRDecoder, pixel_shuffle
from dfrdet_jax.models.detectors import Detector
from dfrdet_jax.models.fpn import upsample_nearest_to
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
    images = jnp.zeros((1, *hw, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    outputs = model.apply(variables, images, train=False)
    sizes = single_stage.feature_sizes(hw, model.strides)
    assert sizes[0] == (-(-hw[0] // 4), -(-hw[1] // 4)) and sizes[-1][0] == 1 + (hw[0] > 64)
    assert outputs["cls_logits"].shape[1] == sum(h * w for h, w in sizes)


def test_pixel_shuffle_matches_index_definition():
    r, c = 4, 3
    x = np.arange(2 * 2 * 3 * c * r * r, dtype=np.float32).reshape(2, 2, 3, c * r * r)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), r))
    assert y.shape == (2, 8, 12, c)
    for b, i, j, ch, di, dj in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 2, 3, 1), (0, 1, 0, 1, 2, 3)]:
        assert y[b, i * r + di, j * r + dj, ch] == x[b, i, j, ch * r * r + di * r + dj]


def test_decoder_from_single_level_and_common_stride():
    decoder = DFRDecoder(width=8, num_blocks=1, common_stride=8)
    levels = [jnp.ones((1, 4, 4, 16)), jnp.ones((1, 2, 2, 16))]
    variables = decoder.init(jax.random.key(0), levels, (32, 32))
    assert decoder.apply(variables, levels, (32, 32)).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="divisible by 8"):
        decoder.init(jax.random.key(0), levels, (36, 32))


def test_postprocess_decodes_and_clips_the_best_point():
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
    )
    assert int(dets.valid.sum()) == 1
    np.testing.assert_allclose(np.asarray(dets.boxes[0, 0]), [4.0, 3.0, 12.0, 10.0])  # x2 clipped
    assert int(dets.classes[0, 0]) == 1
    expected_score = np.sqrt(1 / (1 + np.exp(-10.0)) ** 2)
    np.testing.assert_allclose(float(dets.scores[0, 0]), expected_score, rtol=1e-6)


def test_upsample_nearest_to_an_odd_size_repeats_and_crops():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    y = np.asarray(upsample_nearest_to(jnp.asarray(x), (3, 5)))
    expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, :3, :5]
    np.testing.assert_array_equal(y, expected)
    assert y[0, 2, 4, 0] == x[0, 1, 2, 0]


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
