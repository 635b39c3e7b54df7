"""RetinaNet: anchors, max-IoU matching (against a plain-loop reference), smooth L1, the loss, the
head and its post-processing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.losses.smooth_l1 import smooth_l1_loss
from dfrdet_jax.models.common import BinarySpec
from dfrdet_jax.models.detectors import Detector
from dfrdet_jax.models.heads import dense
from dfrdet_jax.models.heads import retinanet as retinanet_head
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import assign
from dfrdet_jax.ops import boxes as boxes_ops

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
# Max-IoU matching.


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union, inter


def _reference_match(anchors, boxes, labels, valid, ignore, num_classes, pos, neg, low, iof_thr):
    """Plain loops: detectron2's Matcher with allow_low_quality_matches, plus ignore regions."""
    num_anchors = len(anchors)
    out_labels = np.full(num_anchors, num_classes)
    out_positive = np.zeros(num_anchors, bool)
    out_ignore = np.zeros(num_anchors, bool)
    out_gt = np.full(num_anchors, -1)
    assignable = [j for j in range(len(boxes)) if valid[j] and not ignore[j]]
    table = {(i, j): _iou(anchors[i], boxes[j]) for i in range(num_anchors) for j in assignable}
    best_of_box = {j: max(table[i, j][0] for i in range(num_anchors)) for j in assignable}
    for i in range(num_anchors):
        best, match = -1.0, -1
        for j in assignable:  # first maximum wins
            if table[i, j][0] > best:
                best, match = table[i, j][0], j
        positive = best >= pos
        if low:
            positive |= any(
                best_of_box[j] > 0 and table[i, j][0] >= best_of_box[j] - 1e-6 for j in assignable
            )
        area = (anchors[i][2] - anchors[i][0]) * (anchors[i][3] - anchors[i][1])
        covered = any(
            valid[j] and ignore[j] and _iou(anchors[i], boxes[j])[1] / area >= iof_thr
            for j in range(len(boxes))
        )
        if positive:
            out_positive[i], out_labels[i], out_gt[i] = True, labels[match], match
        elif best >= neg or covered:
            out_ignore[i] = True
    return out_labels, out_positive, out_ignore, out_gt


def _random_scene(seed, num_boxes=7, size=48):
    rng = np.random.default_rng(seed)
    wh = rng.uniform(2, 20, (num_boxes, 2))
    xy = rng.uniform(0, size - 20, (num_boxes, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    labels = rng.integers(0, 3, num_boxes).astype(np.int32)
    valid = np.arange(num_boxes) < num_boxes - 1  # the last row is padding
    ignore = np.zeros(num_boxes, bool)
    ignore[1] = True  # an ignore region
    boxes[2] = boxes[3] + np.float32(0.5)  # two boxes almost on top of each other
    return boxes, labels, valid, ignore


@pytest.mark.parametrize(("seed", "low_quality"), list(itertools.product(range(3), (True, False))))
def test_max_iou_matching_equals_the_loop_reference(seed, low_quality):
    anchors, _ = anchors_ops.anchor_grid([(12, 12), (6, 6)], (4, 8), octave_base_scale=2.0)
    boxes, labels, valid, ignore = _random_scene(seed)
    settings = dict(positive_iou=0.5, negative_iou=0.4, low_quality_matches=low_quality)
    got = assign.max_iou_targets(
        jnp.asarray(anchors), boxes, labels, valid, ignore, 3, ignore_iof=0.5, **settings
    )
    ref_labels, ref_positive, ref_ignore, ref_gt = _reference_match(
        anchors, boxes, labels, valid, ignore, 3, 0.5, 0.4, low_quality, 0.5
    )
    np.testing.assert_array_equal(got["positive"], ref_positive)
    np.testing.assert_array_equal(got["labels"], ref_labels)
    np.testing.assert_array_equal(got["ignore"], ref_ignore)
    np.testing.assert_array_equal(got["gt_index"], ref_gt)
    assert ref_positive.any() and ref_ignore.any() and (~ref_positive & ~ref_ignore).any()
    np.testing.assert_allclose(
        got["box_targets"], np.where(ref_positive[:, None], boxes[np.maximum(ref_gt, 0)], anchors)
    )
    # Chunks of 7 anchors (the last one padded) give exactly the same targets.
    chunked = assign.max_iou_targets(
        jnp.asarray(anchors), boxes, labels, valid, ignore, 3, chunk_size=7, **settings
    )
    for key in got:
        np.testing.assert_array_equal(chunked[key], got[key], err_msg=key)


def test_low_quality_match_gives_a_tiny_box_its_best_anchor():
    # 8 px anchors every 4 px; a 3 x 3 px box reaches IoU 9/64 < 0.4 at best.
    anchors, _ = anchors_ops.anchor_grid(
        [(4, 4)], (4,), octave_base_scale=2.0, scales_per_octave=1, aspect_ratios=(1.0,)
    )
    box = np.array([[4.5, 4.5, 7.5, 7.5]], np.float32)  # centred on the cell (1, 1) anchor
    one = (np.zeros(1, np.int32), np.ones(1, bool), np.zeros(1, bool))
    with_low = assign.max_iou_targets(jnp.asarray(anchors), box, *one, 1)
    without = assign.max_iou_targets(jnp.asarray(anchors), box, *one, 1, low_quality_matches=False)
    assert not bool(without["positive"].any())
    assert np.flatnonzero(with_low["positive"]).tolist() == [5]  # cell (1, 1) only
    np.testing.assert_allclose(float(with_low["max_iou"][5]), 9 / 64, rtol=1e-5)
    # An image without any box: all background.
    empty = assign.max_iou_targets(
        jnp.asarray(anchors),
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int32),
        np.zeros(0, bool),
        np.zeros(0, bool),
        1,
    )
    assert not bool(empty["positive"].any() | empty["ignore"].any())
    assert bool((empty["labels"] == 1).all())


def test_matcher_rejects_crossed_thresholds():
    with pytest.raises(ValueError, match="negative_iou <= positive_iou"):
        assign.max_iou_targets(
            jnp.zeros((4, 4)),
            np.zeros((1, 4), np.float32),
            np.zeros(1, np.int32),
            np.ones(1, bool),
            np.zeros(1, bool),
            1,
            positive_iou=0.3,
            negative_iou=0.5,
        )


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
        dense.feature_sizes((32, 32), strides), strides, octave_base_scale=2.0
    )
    targets = assign.max_iou_targets(
        jnp.asarray(anchors), *(batch[k][0] for k in ("boxes", "labels", "box_valid", "ignore")), 2
    )
    num_anchors = len(anchors)
    perfect = boxes_ops.delta_encode(jnp.asarray(anchors), targets["box_targets"])[None]
    logits = jnp.where(
        jax.nn.one_hot(targets["labels"], 2, dtype=bool)[None], 20.0, -20.0
    )  # confident and right everywhere
    settings = dict(anchors=anchors, num_classes=2, box_loss=box_loss)
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
        retinanet_head.retinanet_loss(outputs, batch, anchors=np.zeros((9, 4)), num_classes=2)
    with pytest.raises(ValueError, match="Unknown RetinaNet box_loss 'l2'"):
        retinanet_head.retinanet_loss(
            outputs, batch, anchors=np.zeros((10, 4)), num_classes=2, box_loss="l2"
        )


# ---------------------------------------------------------------------------------------------
# Head, detector and post-processing.


@pytest.mark.parametrize("binary", [False, True])
def test_head_outputs_one_row_per_anchor(binary):
    spec = BinarySpec(enabled=binary)
    head = retinanet_head.RetinaNetHead(3, num_anchors=9, width=16, num_convs=2, binary=spec)
    model = Detector(head=head, backbone_width=8, fpn_width=16, backbone_binary=spec)
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    anchors, _ = anchors_ops.anchor_grid(
        dense.feature_sizes((64, 96), model.strides), model.strides
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
        max_detections=4,
        pre_nms_top_k=6,
    )
    assert int(dets.valid.sum()) == 1 and int(dets.classes[0, 0]) == 1
    w = 16 * np.exp(0.5)
    expected = [20 - w / 2, 8, min(20 + w / 2, 30), 20]  # y2 clipped to the valid height 20
    np.testing.assert_allclose(np.asarray(dets.boxes[0, 0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(dets.scores[0, 0]), 1 / (1 + np.exp(-10.0)), rtol=1e-6)
