"""RetinaNet: anchors, smooth L1, the loss, the head and its post-processing (max-IoU matching:
test_ops_matcher.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.losses.smooth_l1 import smooth_l1_loss
from dfrdet_jax.models.common import BinarySpec
from dfrdet_jax.models.detectors import Detector
from dfrdet_jax.models.heads import retinanet as retinanet_head
from dfrdet_jax.models.heads import single_stage
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import matcher

# config.retinanet's anchors, matching and loss settings (configs/retinanet_r18.py), one chunk.
ANCHORS = dict(octave_base_scale=2.0, scales_per_octave=3, aspect_ratios=(0.5, 1.0, 2.0))
MATCHING = dict(
    positive_iou=0.5, negative_iou=0.4, low_quality_matches=True, ignore_iof=0.5, chunk_size=None
)
LOSS = dict(
    **MATCHING, focal_alpha=0.25, focal_gamma=2.0, smooth_l1_beta=0.0, box_weights=(1.0,) * 4
)

# ---------------------------------------------------------------------------------------------
# Anchors.


def test_anchor_shapes_hand_worked():
    shapes = anchors_ops.anchor_shapes(4, 2.0, 3, (0.5, 1.0, 2.0))
    sizes = [8.0, 8.0 * 2 ** (1 / 3), 8.0 * 2 ** (2 / 3)]
    expected = [(s / np.sqrt(r), s * np.sqrt(r)) for r in (0.5, 1.0, 2.0) for s in sizes]
    np.testing.assert_allclose(shapes, expected, rtol=1e-6)
    # Constant area per scale, h / w = the ratio.
    np.testing.assert_allclose(shapes.prod(1), np.tile(np.square(sizes), 3), rtol=1e-5)
    np.testing.assert_allclose(shapes[:, 1] / shapes[:, 0], np.repeat([0.5, 1, 2], 3), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scales_per_octave=0), "scales_per_octave >= 1"),
        (dict(aspect_ratios=()), "at least one aspect ratio"),
        (dict(aspect_ratios=(1.0, -2.0)), "must be positive"),
    ],
)
def test_anchor_settings_errors(kwargs, message):
    settings = dict(stride=8, octave_base_scale=4.0, scales_per_octave=3, aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match=message):
        anchors_ops.anchor_shapes(**{**settings, **kwargs})


def test_anchor_grid_order_is_level_cell_shape():
    sizes, strides = [(2, 3), (1, 2)], (4, 8)
    grid, level = anchors_ops.anchor_grid(
        sizes, strides, octave_base_scale=1.0, scales_per_octave=2, aspect_ratios=(1.0,)
    )
    assert grid.shape == (2 * (6 + 2), 4) and grid.dtype == np.float32
    np.testing.assert_array_equal(level, [0] * 12 + [1] * 4)
    # Level 0, cell (row 1, col 2) = index 5, its second shape (4 * sqrt 2 px) at (10, 6) px.
    half = 4 * np.sqrt(2) / 2
    np.testing.assert_allclose(grid[5 * 2 + 1], [10 - half, 6 - half, 10 + half, 6 + half])
    # Level 1, cell (0, 1): first shape 8 px at (12, 4).
    np.testing.assert_allclose(grid[12 + 1 * 2], [8, 0, 16, 8])


# ---------------------------------------------------------------------------------------------
# Smooth L1 and the loss.


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_smooth_l1_value_and_gradient_against_numpy(beta):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5])
    d = pred - target
    if beta:
        per = np.where(np.abs(d) < beta, 0.5 * d**2 / beta, np.abs(d) - 0.5 * beta)
        grad = np.where(np.abs(d) < beta, d / beta, np.sign(d))
    else:
        per, grad = np.abs(d), np.sign(d)
    expected = (per.sum(1) * weights).sum()
    value, g = jax.value_and_grad(lambda p: smooth_l1_loss(p, target, weights, beta))(pred)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), grad * weights[:, None], rtol=1e-5, atol=1e-6)


def _scene_batch(size=32):
    boxes = np.array([[[4, 4, 12, 12], [17, 9, 29, 15], [0, 0, 0, 0]]], np.float32)
    labels = np.array([[0, 1, -1]], np.int32)
    return {
        "image": np.zeros((1, size, size, 3), np.uint8),
        "boxes": boxes,
        "labels": labels,
        "box_valid": labels >= 0,
        "ignore": np.zeros_like(labels, bool),
    }


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_loss_is_zero_for_perfect_boxes_and_its_gradient_is_finite(box_loss):
    batch = _scene_batch()
    strides = (4, 8)
    anchors, _ = anchors_ops.anchor_grid(
        single_stage.feature_sizes((32, 32), strides), strides, **ANCHORS
    )
    targets = matcher.max_iou_targets(
        jnp.asarray(anchors),
        *(batch[k][0] for k in ("boxes", "labels", "box_valid", "ignore")),
        2,
        **MATCHING,
    )
    num_anchors = len(anchors)
    perfect = boxes_ops.delta_encode(jnp.asarray(anchors), targets["box_targets"])[None]
    logits = jnp.where(
        jax.nn.one_hot(targets["labels"], 2, dtype=bool)[None], 20.0, -20.0
    )  # confident and right everywhere
    settings = dict(anchors=anchors, num_classes=2, box_loss=box_loss, **LOSS)
    losses = retinanet_head.retinanet_loss(
        {"cls_logits": logits, "deltas": perfect}, batch, **settings
    )
    assert float(losses["num_positive"]) == float(targets["positive"].sum()) >= 2
    assert float(losses["loss_box"]) < 1e-5 and float(losses["loss_cls"]) < 1e-6

    def total(outputs):
        parts = retinanet_head.retinanet_loss(outputs, batch, **settings)
        return parts["loss_cls"] + parts["loss_box"]

    zeros = {"cls_logits": jnp.zeros((1, num_anchors, 2)), "deltas": jnp.zeros((1, num_anchors, 4))}
    grads = jax.grad(total)(zeros)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # Only positive anchors receive a box gradient.
    moved = np.asarray(jnp.abs(grads["deltas"][0]).sum(-1) > 0)
    np.testing.assert_array_equal(moved, np.asarray(targets["positive"]))


def test_loss_checks_the_anchor_count():
    batch = _scene_batch()
    outputs = {"cls_logits": jnp.zeros((1, 10, 2)), "deltas": jnp.zeros((1, 10, 4))}
    with pytest.raises(ValueError, match="9 anchors for 10 predictions"):
        retinanet_head.retinanet_loss(
            outputs, batch, anchors=np.zeros((9, 4)), num_classes=2, box_loss="smooth_l1", **LOSS
        )
    with pytest.raises(ValueError, match="Unknown RetinaNet box_loss 'l2'"):
        retinanet_head.retinanet_loss(
            outputs, batch, anchors=np.zeros((10, 4)), num_classes=2, box_loss="l2", **LOSS
        )


# ---------------------------------------------------------------------------------------------
# Head, detector and post-processing.


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True])
def test_head_outputs_one_row_per_anchor(binary):
    spec = BinarySpec(enabled=binary)
    head = retinanet_head.RetinaNetHead(3, num_anchors=9, width=16, num_convs=2, binary=spec)
    model = Detector(head=head, backbone_width=8, fpn_width=16, backbone_binary=spec)
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    anchors, _ = anchors_ops.anchor_grid(
        single_stage.feature_sizes((64, 96), model.strides), model.strides, **ANCHORS
    )
    assert out["cls_logits"].shape == (2, len(anchors), 3)
    assert out["deltas"].shape == (2, len(anchors), 4)
    head_params = variables["params"]["head"]
    assert ("alpha" in head_params["cls_tower0"]["conv"]) == binary  # binary towers
    assert "alpha" not in head_params["cls_logits"]  # real prediction convs
    # The classifier starts at the 0.01 prior.
    np.testing.assert_allclose(
        float(jax.nn.sigmoid(head_params["cls_logits"]["bias"][0])), 0.01, rtol=1e-5
    )


def test_postprocess_decodes_and_clips_the_best_anchor():
    anchors = np.array([[0, 0, 8, 8], [4, 4, 12, 12], [8, 8, 24, 24]], np.float32)
    cls = jnp.full((1, 3, 2), -10.0).at[0, 2, 1].set(10.0)
    # Anchor 2 (centre 16, 16; 16 px) moved by (+0.25 w, 0) and widened by e^0.5.
    deltas = jnp.zeros((1, 3, 4)).at[0, 2].set(jnp.array([0.25, 0.0, 0.5, 0.0]))
    dets = retinanet_head.retinanet_postprocess(
        {"cls_logits": cls, "deltas": deltas},
        jnp.array([[20, 30]]),
        anchors=anchors,
        box_weights=(1.0,) * 4,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=4,
        pre_nms_top_k=6,
    )
    assert int(dets.valid.sum()) == 1 and int(dets.classes[0, 0]) == 1
    w = 16 * np.exp(0.5)
    expected = [20 - w / 2, 8, min(20 + w / 2, 30), 20]  # y2 clipped to the valid height 20
    np.testing.assert_allclose(np.asarray(dets.boxes[0, 0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(dets.scores[0, 0]), 1 / (1 + np.exp(-10.0)), rtol=1e-6)
