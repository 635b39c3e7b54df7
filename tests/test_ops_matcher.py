"""Max-IoU matching against a plain-loop reference (detectron2's Matcher with low-quality
matches and ignore regions), chunking, padding slots, tiny boxes, empty images and the threshold
check."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import matcher

# RetinaNet's anchors and matching settings (configs/retinanet_r18.py), one chunk.
ANCHORS = dict(octave_base_scale=2.0, scales_per_octave=3, aspect_ratios=(0.5, 1.0, 2.0))
MATCHING = dict(
    positive_iou=0.5, negative_iou=0.4, low_quality_matches=True, ignore_iof=0.5, chunk_size=None
)


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
    anchors, _ = anchors_ops.anchor_grid([(12, 12), (6, 6)], (4, 8), **ANCHORS)
    boxes, labels, valid, ignore = _random_scene(seed)
    settings = {**MATCHING, "low_quality_matches": low_quality}
    got = matcher.max_iou_targets(jnp.asarray(anchors), boxes, labels, valid, ignore, 3, **settings)
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
    # Chunks of 7 anchors (the last one padded) give the same targets.
    chunked = matcher.max_iou_targets(
        jnp.asarray(anchors), boxes, labels, valid, ignore, 3, **{**settings, "chunk_size": 7}
    )
    _assert_same_targets(chunked, got)
    # So do 9 more padding slots (what a batch cut to fewer box slots leaves out).
    padded = matcher.max_iou_targets(
        jnp.asarray(anchors),
        np.pad(boxes, ((0, 9), (0, 0))),
        np.pad(labels, (0, 9), constant_values=-1),
        np.pad(valid, (0, 9)),
        np.pad(ignore, (0, 9)),
        3,
        **settings,
    )
    _assert_same_targets(padded, got)


def _assert_same_targets(got, want):
    """Every target equal; the overlaps (max_iou) to within rounding, which XLA's code for
    another shape may change (a last bit, seen with its CPU fusion emitters off)."""
    assert got.keys() == want.keys()
    for key in want:
        if key == "max_iou":
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_low_quality_match_gives_a_tiny_box_its_best_anchor():
    # 8 px anchors every 4 px; a 3 x 3 px box reaches IoU 9/64 < 0.4 at best.
    anchors, _ = anchors_ops.anchor_grid(
        [(4, 4)], (4,), octave_base_scale=2.0, scales_per_octave=1, aspect_ratios=(1.0,)
    )
    box = np.array([[4.5, 4.5, 7.5, 7.5]], np.float32)  # centred on the cell (1, 1) anchor
    one = (np.zeros(1, np.int32), np.ones(1, bool), np.zeros(1, bool))
    with_low = matcher.max_iou_targets(jnp.asarray(anchors), box, *one, 1, **MATCHING)
    without = matcher.max_iou_targets(
        jnp.asarray(anchors), box, *one, 1, **{**MATCHING, "low_quality_matches": False}
    )
    assert not bool(without["positive"].any())
    assert np.flatnonzero(with_low["positive"]).tolist() == [5]  # cell (1, 1) only
    np.testing.assert_allclose(float(with_low["max_iou"][5]), 9 / 64, rtol=1e-5)
    # An image without any box: all background.
    empty = matcher.max_iou_targets(
        jnp.asarray(anchors),
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int32),
        np.zeros(0, bool),
        np.zeros(0, bool),
        1,
        **MATCHING,
    )
    assert not bool(empty["positive"].any() | empty["ignore"].any())
    assert bool((empty["labels"] == 1).all())


def test_matcher_rejects_crossed_thresholds():
    with pytest.raises(ValueError, match="negative_iou <= positive_iou"):
        matcher.max_iou_targets(
            jnp.zeros((4, 4)),
            np.zeros((1, 4), np.float32),
            np.zeros(1, np.int32),
            np.ones(1, bool),
            np.zeros(1, bool),
            1,
            **{**MATCHING, "positive_iou": 0.3, "negative_iou": 0.5},
        )
