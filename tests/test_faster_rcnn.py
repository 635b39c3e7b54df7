"""Faster R-CNN: RoIAlign (against a plain-loop bilinear reference), level choice, balanced
sampling, RPN targets and proposals (per level, as mmdetection), RoI sampling, the box-head loss
and post-processing, and a train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax import steps
from dfrdet_jax.models import registry
from dfrdet_jax.models.detectors import normalize_images
from dfrdet_jax.models.heads import faster_rcnn, roi_head, rpn
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import roi_align, sampling

# The RPN's proposal settings of configs/faster_rcnn_r18.py and the NMS settings of
# dfrdet_jax/base_config.py, where a test does not set its own.
PROPOSALS = dict(
    pre_nms_top_k_per_level=2000, min_size=0.0, box_weights=faster_rcnn.RPN_BOX_WEIGHTS
)
NMS = dict(score_threshold=0.05, iou_threshold=0.5)

# ---------------------------------------------------------------------------------------------
# RoIAlign.


def _bilinear(feature, y, x):
    """torchvision's bilinear_interpolate for one point of an [H, W, C] map."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feature[y0, x0]
        + (1 - ly) * lx * feature[y0, x1]
        + ly * (1 - lx) * feature[y1, x0]
        + ly * lx * feature[y1, x1]
    )


def _reference_roi_align(feature, stride, roi, size, ratio):
    """Loops over bins and samples, aligned=True (half-pixel offset)."""
    x1, y1, x2, y2 = (v / stride - 0.5 for v in roi)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    out = np.zeros((size, size, feature.shape[-1]))
    for i in range(size):
        for j in range(size):
            for sy in range(ratio):
                for sx in range(ratio):
                    y = y1 + i * bin_h + (sy + 0.5) * bin_h / ratio
                    x = x1 + j * bin_w + (sx + 0.5) * bin_w / ratio
                    out[i, j] += _bilinear(feature, y, x)
    return out / ratio**2


def test_roi_align_equals_the_loop_reference_on_two_levels():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(8, 10, 3)).astype(np.float32), rng.normal(size=(4, 5, 3))]
    maps[1] = maps[1].astype(np.float32)
    strides = (4, 8)
    # Inside, straddling the border, past the border, tiny, and a level-1 RoI.
    rois = np.array(
        [
            [3, 5, 21, 17],
            [-6, -3, 9, 10],
            [30, 20, 47, 40],
            [12.2, 9.9, 13.1, 11.0],
            [2, 4, 35, 29],
        ],
        np.float32,
    )
    level = np.array([0, 0, 0, 0, 1], np.int32)
    got = roi_align.multilevel_roi_align(
        [jnp.asarray(m) for m in maps], strides, jnp.asarray(rois), jnp.asarray(level), 3, 2
    )
    for r in range(len(rois)):
        expected = _reference_roi_align(maps[level[r]], strides[level[r]], rois[r], 3, 2)
        np.testing.assert_allclose(np.asarray(got[r]), expected, rtol=1e-5, atol=1e-5)


def test_roi_align_of_a_linear_ramp_is_its_value_at_the_bin_centres():
    # f(y, x) = 2 x + 3 y on cell centres: bilinear sampling is exact, and so is the bin mean.
    ys, xs = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
    feature = (2 * xs + 3 * ys)[..., None].astype(np.float32)
    roi = np.array([[8.0, 12.0, 40.0, 28.0]], np.float32)  # stride 4 -> cells 1.5..9.5, 2.5..6.5
    got = np.asarray(
        roi_align.multilevel_roi_align([jnp.asarray(feature)], (4,), roi, jnp.zeros(1), 2, 2)
    )[0, ..., 0]
    centres_x = 8 / 4 - 0.5 + (np.arange(2) + 0.5) * (32 / 4) / 2
    centres_y = 12 / 4 - 0.5 + (np.arange(2) + 0.5) * (16 / 4) / 2
    np.testing.assert_allclose(got, 2 * centres_x[None, :] + 3 * centres_y[:, None], rtol=1e-6)


def test_roi_levels_follow_the_fpn_rule():
    sides = np.array([4.0, 111.0, 112.0, 224.0, 448.0, 2000.0])
    rois = np.stack([np.zeros(6), np.zeros(6), sides, sides], 1)
    levels = roi_align.roi_levels(jnp.asarray(rois), 2, 5, canonical_level=4)
    expected = [min(max(math.floor(4 + math.log2(s / 224)), 2), 5) for s in sides]
    np.testing.assert_array_equal(levels, expected)
    assert np.asarray(levels).tolist() == [2, 2, 3, 4, 5, 5]


# ---------------------------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize(("num_positive", "num_negative"), [(3, 100), (40, 100), (40, 5)])
def test_balanced_sample_counts_and_membership(num_positive, num_negative):
    size = 200
    positive = np.zeros(size, bool)
    negative = np.zeros(size, bool)
    positive[:num_positive] = True
    negative[100 : 100 + num_negative] = True
    index, valid, is_positive = sampling.balanced_sample(
        jax.random.key(1), positive, negative, 32, 0.25
    )
    index, valid, is_positive = map(np.asarray, (index, valid, is_positive))
    drawn = index[valid]
    assert len(set(drawn.tolist())) == len(drawn)  # without replacement
    assert is_positive.sum() == min(num_positive, 8)  # 25 % of 32 at most
    assert (positive[drawn] == is_positive[valid]).all()
    assert (negative[drawn] | positive[drawn]).all()
    assert valid.sum() == min(32, min(num_positive, 8) + num_negative)
    assert valid[: valid.sum()].all() and is_positive[: is_positive.sum()].all()  # order
    # Another key draws other negatives.
    other = np.asarray(sampling.balanced_sample(jax.random.key(2), positive, negative, 32, 0.25)[0])
    assert num_negative <= 32 or set(other.tolist()) != set(index.tolist())


# ---------------------------------------------------------------------------------------------
# RPN.


def test_rpn_targets_draw_a_balanced_sample_of_matched_anchors():
    grid = np.arange(0, 64, 4, dtype=np.float32)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    anchors = np.stack([xs, ys, xs + 8, ys + 8], -1).reshape(-1, 4)  # 256 anchors of 8 px
    boxes = np.array([[8, 8, 16, 16], [30, 30, 39, 40], [0, 0, 0, 0]], np.float32)
    valid = np.array([True, True, False])
    match = rpn.rpn_match(
        jnp.asarray(anchors),
        boxes,
        valid,
        np.zeros(3, bool),
        positive_iou=0.7,
        negative_iou=0.3,
        ignore_iof=faster_rcnn.IGNORE_IOF,
        chunk_size=None,
    )
    targets = rpn.rpn_targets(
        jax.random.key(0),
        jnp.asarray(anchors),
        match,
        num_samples=16,
        positive_fraction=0.5,
        box_weights=faster_rcnn.RPN_BOX_WEIGHTS,
    )
    weight, positive = np.asarray(targets["weight"]), np.asarray(targets["positive"])
    # Positives: the anchor equal to box 0 (IoU 1) and box 1's best anchor (IoU 56 / 98, a
    # low-quality match); both drawn, the other 14 draws negatives.
    exact = int(np.flatnonzero((anchors == boxes[0]).all(1))[0])
    best = int(np.flatnonzero((anchors == [32, 32, 40, 40]).all(1))[0])
    assert np.flatnonzero(positive).tolist() == sorted([exact, best])
    assert weight.sum() == 16 and (weight[positive] == 1).all()
    np.testing.assert_array_equal(targets["objectness"], positive.astype(np.float32))
    np.testing.assert_allclose(targets["deltas"][exact], 0.0, atol=1e-6)
    assert np.abs(np.asarray(targets["deltas"])[~positive]).max() == 0


def test_rpn_proposals_decode_clip_and_suppress():
    anchors = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32
    )
    logits = jnp.array([3.0, 2.0, 1.0, 0.5])
    deltas = jnp.zeros((4, 4)).at[3].set(jnp.array([0.5, 0.0, 0.0, 0.0]))  # shifted right 5 px
    boxes, scores, valid = rpn.rpn_proposals(
        logits,
        deltas,
        jnp.asarray(anchors),
        (4,),
        jnp.array([48, 52]),
        post_nms_top_k=4,
        nms_iou=0.5,
        **PROPOSALS,
    )
    assert np.asarray(valid).tolist() == [True, True, True, False]  # anchor 1 suppressed by 0
    np.testing.assert_allclose(boxes[:3], [[0, 0, 10, 10], [20, 20, 30, 30], [45, 40, 52, 48]])
    np.testing.assert_allclose(scores[:3], jax.nn.sigmoid(jnp.array([3.0, 1.0, 0.5])), rtol=1e-6)
    _, _, valid = rpn.rpn_proposals(
        logits,
        deltas,
        jnp.asarray(anchors),
        (4,),
        jnp.array([48, 52]),
        post_nms_top_k=4,
        nms_iou=0.5,
        **{**PROPOSALS, "min_size": 9.5},
    )
    assert int(np.asarray(valid).sum()) == 2  # the clipped 7 x 8 px proposal is too small


def _square(x, y, side=8.0):
    return [x, y, x + side, y + side]


def test_rpn_proposals_take_the_top_k_of_each_level():
    # Three levels of 6, 2 and 1 anchors, none overlapping. Every anchor of the fine level
    # scores above the coarse ones: one top-2 (or top-4) over all levels would keep only fine
    # anchors; mmdetection's per-level top-2 keeps the 2 best of each (the 1 of the last), all
    # survive NMS, and the 8 output slots hold them best first, then 3 padding slots.
    anchors = np.array([_square(20.0 * i, 0.0) for i in range(9)], np.float32)
    logits = jnp.array([5.0, 3.0, 4.0, 2.5, 2.0, 1.5, 0.5, 1.0, 0.2])
    assert set(np.argsort(-np.asarray(logits))[:4]) <= set(range(6))  # the global top-4
    proposals = jax.jit(
        lambda logits: rpn.rpn_proposals(
            logits,
            jnp.zeros((9, 4)),
            jnp.asarray(anchors),
            (6, 2, 1),
            jnp.array([100, 200]),
            pre_nms_top_k_per_level=2,
            post_nms_top_k=8,
            nms_iou=0.7,
            min_size=0.0,
            box_weights=faster_rcnn.RPN_BOX_WEIGHTS,
        )
    )
    boxes, scores, valid = proposals(logits)
    assert boxes.shape == (8, 4) and scores.shape == (8,) and valid.shape == (8,)
    kept = [0, 2, 7, 6, 8]  # logits 5, 4 (fine), 1, 0.5 (coarse), 0.2 (coarsest)
    assert np.asarray(valid).tolist() == [True] * 5 + [False] * 3
    np.testing.assert_allclose(boxes[:5], anchors[kept])
    np.testing.assert_allclose(scores[:5], jax.nn.sigmoid(logits[np.array(kept)]), rtol=1e-6)
    assert not np.asarray(boxes[5:]).any() and not np.asarray(scores[5:]).any()


def test_rpn_proposals_suppress_within_a_level_only():
    # mmcv's batched_nms with the level as the id: the same box on two levels survives twice;
    # an overlapping one (IoU 225 / 287 = 0.78 > 0.7) on the same level is suppressed.
    anchors = jnp.array([[0, 0, 16, 16], [1, 1, 17, 17], [0, 0, 16, 16]], jnp.float32)
    boxes, scores, valid = rpn.rpn_proposals(
        jnp.array([3.0, 2.0, 1.0]),
        jnp.zeros((3, 4)),
        anchors,
        (2, 1),
        jnp.array([64, 64]),
        post_nms_top_k=3,
        nms_iou=0.7,
        **PROPOSALS,
    )
    assert np.asarray(valid).tolist() == [True, True, False]
    np.testing.assert_allclose(boxes[:2], [[0, 0, 16, 16], [0, 0, 16, 16]])
    np.testing.assert_allclose(scores[:2], jax.nn.sigmoid(jnp.array([3.0, 1.0])), rtol=1e-6)
    with pytest.raises(ValueError, match="do not add up to the 3 anchors"):
        rpn.rpn_proposals(
            jnp.zeros(3),
            jnp.zeros((3, 4)),
            anchors,
            (2, 2),
            jnp.array([64, 64]),
            post_nms_top_k=3,
            nms_iou=0.7,
            **PROPOSALS,
        )


def test_rpn_loss_by_hand():
    outputs = {"rpn_logits": jnp.array([[0.0, 2.0, -1.0]]), "rpn_deltas": jnp.ones((1, 3, 4))}
    targets = {
        "objectness": jnp.array([[1.0, 0.0, 0.0]]),
        "weight": jnp.array([[1.0, 1.0, 0.0]]),
        "positive": jnp.array([[True, False, False]]),
        "deltas": jnp.array([[[0.5, 1.0, 1.5, 3.0], [0, 0, 0, 0], [0, 0, 0, 0]]]),
    }
    losses = rpn.rpn_loss(outputs, targets, smooth_l1_beta=0.0)
    bce = math.log(2) + math.log(1 + math.exp(2.0))
    np.testing.assert_allclose(float(losses["loss_rpn_cls"]), bce / 2, rtol=1e-6)
    np.testing.assert_allclose(float(losses["loss_rpn_box"]), (0.5 + 0 + 0.5 + 2) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# RoI sampling, loss and post-processing.


def test_sample_rois_adds_the_ground_truth_and_encodes_deltas():
    proposals = np.array([[10, 10, 20, 20], [11, 10, 21, 20], [50, 50, 60, 60], [0, 0, 0, 0]])
    proposals = proposals.astype(np.float32)
    proposal_valid = np.array([True, True, True, False])
    boxes = np.array([[10, 10, 20, 20], [30, 30, 44, 40], [0, 0, 0, 0]], np.float32)
    labels = np.array([2, 0, -1], np.int32)
    valid = np.array([True, True, False])

    def sample(slots):  # the ground truth in ``slots`` box slots (3 + padding)
        pad = slots - 3
        return roi_head.sample_rois(
            jax.random.key(0),
            proposals,
            proposal_valid,
            np.pad(boxes, ((0, pad), (0, 0))),
            np.pad(labels, (0, pad), constant_values=-1),
            np.pad(valid, (0, pad)),
            np.zeros(slots, bool),
            3,
            num_samples=6,
            positive_fraction=0.5,
            positive_iou=0.5,
            negative_iou=0.5,
            ignore_iof=faster_rcnn.IGNORE_IOF,
            box_weights=faster_rcnn.ROI_BOX_WEIGHTS,
        )

    out = sample(3)
    for key, value in sample(16).items():  # more padding slots draw the same RoIs
        np.testing.assert_array_equal(value, out[key], err_msg=key)
    weight, positive = np.asarray(out["weight"]), np.asarray(out["positive"])
    rois, got_labels = np.asarray(out["rois"]), np.asarray(out["labels"])
    # Candidates: 3 valid proposals + 2 boxes. Positives: proposals 0, 1 and both boxes (4 > 3).
    assert positive.sum() == 3 and weight.sum() == 4  # 3 positives + the one negative
    assert {tuple(r) for r in rois[weight > 0]} >= {(50, 50, 60, 60)}
    for roi, label, is_pos, delta in zip(rois, got_labels, positive, np.asarray(out["deltas"])):
        if not is_pos:
            assert label == 3 and not delta.any()
            continue
        gt = 0 if roi[0] < 25 else 1
        assert label == labels[gt]
        expected = boxes_ops.delta_encode(jnp.asarray(roi), boxes[gt], (10.0, 10.0, 5.0, 5.0))
        np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_roi_loss_by_hand_and_its_gradient():
    logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]]])  # C = 2, + bg
    deltas = jnp.zeros((1, 3, 2, 4)).at[0, 0, 0].set(jnp.array([1.0, -1.0, 0.0, 2.0]))
    targets = {
        "labels": jnp.array([[0, 2, 1]]),
        "deltas": jnp.array([[[0.5, 0.0, 0.25, 0.0], [0, 0, 0, 0], [0, 0, 0, 0]]]),
        "weight": jnp.array([[1.0, 1.0, 0.0]]),
        "positive": jnp.array([[True, False, False]]),
    }
    outputs = {"roi_cls_logits": logits, "roi_deltas": deltas}
    losses = roi_head.roi_loss(outputs, targets, smooth_l1_beta=0.0)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(1 / (2 + math.exp(1)))
    np.testing.assert_allclose(float(losses["loss_roi_cls"]), (ce0 + ce1) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(losses["loss_roi_box"]), (0.5 + 1 + 0.25 + 2) / 2, rtol=1e-6)
    grad = jax.grad(lambda o: roi_head.roi_loss(o, targets, 0.0)["loss_roi_box"])(outputs)[
        "roi_deltas"
    ]
    expected = np.zeros((1, 3, 2, 4))
    expected[0, 0, 0] = np.sign([0.5, -1.0, -0.25, 2.0]) / 2  # only RoI 0's own class
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7)


def test_roi_postprocess_moves_the_proposal_by_its_class_deltas():
    proposals = jnp.array([[[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 5.0, 5.0]]])
    logits = jnp.array([[[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0]]])  # proposal 1 is invalid
    deltas = jnp.zeros((1, 2, 2, 4)).at[0, 0, 1].set(jnp.array([1.0, 0.0, 0.0, 5.0 * math.log(2)]))
    dets = roi_head.roi_postprocess(
        {
            "roi_cls_logits": logits,
            "roi_deltas": deltas,
            "proposals": proposals,
            "proposal_valid": jnp.array([[True, False]]),
        },
        jnp.array([[100, 100]]),
        box_weights=faster_rcnn.ROI_BOX_WEIGHTS,
        max_detections=3,
        pre_nms_top_k=4,
        **NMS,
    )
    assert int(dets.valid.sum()) == 1 and int(dets.classes[0, 0]) == 1
    # dx = 1 / 10 of 20 px = +2 px; h doubled from 10 to 20 px around y = 15.
    np.testing.assert_allclose(np.asarray(dets.boxes[0, 0]), [12, 5, 32, 25], rtol=1e-5)
    p = math.exp(5) / (math.exp(5) + 2 * math.exp(-5))
    np.testing.assert_allclose(float(dets.scores[0, 0]), p, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The whole detector.


def test_a_smoke_train_step_is_finite_and_inference_keeps_the_test_proposals(
    smoke_config, make_batch
):
    config = smoke_config("bnn", "faster_rcnn")
    f = config.faster_rcnn
    assert f.rpn_post_nms_top_k_test != f.roi_num_samples  # the shapes below tell them apart
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 1)
    batch = make_batch()
    _, metrics = jax.jit(steps.make_train_step(config, model, 1))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["num_rpn_positive"]) > 0
    outputs = jax.eval_shape(
        lambda: model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            normalize_images(batch["image"]),
            train=False,
            **registry.apply_kwargs(config, batch, train=False),
        )
    )
    assert outputs["proposals"].shape == (2, f.rpn_post_nms_top_k_test, 4)
    assert outputs["roi_cls_logits"].shape == (2, f.rpn_post_nms_top_k_test, 4)
