"""The pipeline's sparse assigners against the device's dense ones, case by case: RetinaNet's
anchor matcher against ops.matcher, FCOS's point assigner against ops.fcos_assign."""

import numpy as np
import pytest

from dfrdet_jax.ops import fcos_assign, host_targets, matcher
from dfrdet_jax.ops.boxes import pairwise_intersection

STRIDES = (4, 8, 16, 32, 64)
ANCHORS = {"octave_base_scale": 2.0, "scales_per_octave": 3, "aspect_ratios": (0.5, 1.0, 2.0)}
SETTINGS = {
    "positive_iou": 0.5,
    "negative_iou": 0.4,
    "low_quality_matches": True,
    "ignore_iof": 0.5,
}


def _feature_sizes(size):
    return [(-(-size // s), -(-size // s)) for s in STRIDES]


def _ground_truth(rng, num_boxes, num_slots, size, ignore_share=0.2):
    """Random boxes of 1-60 px, some reaching past the image, padded to num_slots rows."""
    centre = rng.uniform(-4, size + 4, (num_boxes, 2))
    wh = np.exp(rng.uniform(np.log(1.0), np.log(60.0), (num_boxes, 2)))
    boxes = np.zeros((num_slots, 4), np.float32)
    boxes[:num_boxes] = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1)
    valid = np.arange(num_slots) < num_boxes
    ignore = valid & (rng.random(num_slots) < ignore_share)
    labels = rng.integers(0, 3, num_slots).astype(np.int32)
    return boxes, labels, valid, ignore


def _dense_codes(size, boxes, labels, valid, ignore, settings):
    """The device matcher's assignment, written as host_targets codes."""
    sparse = host_targets.AnchorMatcher(_feature_sizes(size), STRIDES, **ANCHORS, **settings)
    out = matcher.max_iou_targets(
        sparse.anchors, boxes, labels, valid, ignore, 3, chunk_size=None, **settings
    )
    positive, ignored = np.asarray(out["positive"]), np.asarray(out["ignore"])
    codes = np.where(positive, np.asarray(out["gt_index"]), host_targets.BACKGROUND)
    return np.where(ignored, host_targets.IGNORED, codes), sparse


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        dict(SETTINGS, low_quality_matches=False, ignore_iof=0.9),
        dict(SETTINGS, negative_iou=0.0, positive_iou=0.3),
        dict(SETTINGS, positive_iou=0.0, negative_iou=0.0),  # every anchor positive
        dict(SETTINGS, ignore_iof=0.0),  # any ignore region covers every anchor
    ],
)
@pytest.mark.parametrize("num_boxes", [0, 1, 40])
def test_sparse_matching_assigns_as_the_dense_matcher(settings, num_boxes):
    rng = np.random.default_rng(num_boxes)
    ground_truth = _ground_truth(rng, num_boxes, 48, 96)
    expected, sparse = _dense_codes(96, *ground_truth, settings)
    boxes, _, valid, ignore = ground_truth
    got = sparse(boxes, valid, ignore)
    assert got.dtype == np.int32 and got.shape == (sparse.num_anchors,)
    np.testing.assert_array_equal(got, expected)
    if num_boxes == 40 and settings is SETTINGS:  # the case is not vacuous
        assert (got >= 0).sum() > 40 and (got == host_targets.IGNORED).any()


def test_a_box_whose_best_iou_is_within_the_tie_tolerance_makes_every_anchor_positive():
    # A 0.005 px box: its best IoU (about 4e-7) is within 1e-6 of the IoU 0 of every other
    # anchor, so the dense rule counts each anchor as one of its best.
    boxes = np.array([[50, 50, 50.005, 50.005], [10, 10, 30, 30]], np.float32)
    valid, ignore = np.array([True, True]), np.array([False, False])
    expected, sparse = _dense_codes(64, boxes, np.zeros(2, np.int32), valid, ignore, SETTINGS)
    assert (expected >= 0).all()
    np.testing.assert_array_equal(sparse(boxes, valid, ignore), expected)


def test_grid_windows_hold_every_anchor_box_pair_that_overlaps():
    rng = np.random.default_rng(3)
    boxes, _, _, _ = _ground_truth(rng, 30, 30, 80)
    sparse = host_targets.AnchorMatcher(_feature_sizes(80), STRIDES, **ANCHORS, **SETTINGS)
    box_of, anchor_of = sparse.windows.pairs(boxes)
    overlapping = np.asarray(pairwise_intersection(sparse.anchors, boxes)) > 0  # [A, N]
    listed = np.zeros_like(overlapping)
    listed[anchor_of, box_of] = True
    assert not (overlapping & ~listed).any()
    assert len(np.unique(anchor_of * 30 + box_of)) == len(box_of)  # each pair once
    assert len(box_of) < overlapping.size / 2  # and fewer than all of them


def test_match_rejects_arrays_of_other_lengths():
    sparse = host_targets.AnchorMatcher(_feature_sizes(64), STRIDES, **ANCHORS, **SETTINGS)
    with pytest.raises(ValueError, match="ignore"):
        sparse(np.zeros((3, 4), np.float32), np.ones(3, bool), np.zeros(2, bool))


def _dense_point_codes(size, boxes, labels, valid, ignore, ranges, **settings):
    """fcos_targets' assignment, written as host_targets codes, and the sparse assigner."""
    sizes = _feature_sizes(size)
    sparse = host_targets.PointAssigner(sizes, STRIDES, regress_ranges=ranges, **settings)
    points = np.stack([sparse.px, sparse.py], axis=1)
    out = fcos_assign.fcos_targets(
        points, sparse.level, ranges, STRIDES, boxes, labels, valid, ignore, 3, chunk_size=None,
        **settings,
    )  # fmt: skip
    positive, ignored = np.asarray(out["positive"]), np.asarray(out["ignore"])
    codes = np.where(positive, np.asarray(out["gt_index"]), host_targets.BACKGROUND)
    return np.where(ignored, host_targets.IGNORED, codes), sparse


@pytest.mark.parametrize("center_sampling", [False, True])
@pytest.mark.parametrize("num_boxes", [0, 1, 40])
@pytest.mark.parametrize("multiple", [4.0, 1.0])  # 1x the stride: many boxes fit no level
def test_sparse_point_assignment_assigns_as_fcos_targets(center_sampling, num_boxes, multiple):
    rng = np.random.default_rng(num_boxes)
    ground_truth = _ground_truth(rng, num_boxes, 48, 96)
    ranges = fcos_assign.tiny_object_regress_ranges(STRIDES, multiple)
    settings = {"center_sampling": center_sampling, "center_radius": 1.5}
    expected, sparse = _dense_point_codes(96, *ground_truth, ranges, **settings)
    boxes, _, valid, ignore = ground_truth
    got = sparse(boxes, valid, ignore)
    assert got.dtype == np.int32 and got.shape == (sparse.num_points,)
    np.testing.assert_array_equal(got, expected)
    if num_boxes == 40:  # the case is not vacuous
        assert (got >= 0).sum() > 10 and (got == host_targets.IGNORED).any()


def test_point_assigner_takes_the_smaller_box_and_the_lower_slot_on_a_tie():
    # Two equal boxes and a larger one around the same points: the lower slot of the two.
    boxes = np.array([[0, 0, 40, 40], [8, 8, 24, 24], [8, 8, 24, 24]], np.float32)
    valid, ignore = np.ones(3, bool), np.zeros(3, bool)
    ranges = fcos_assign.tiny_object_regress_ranges(STRIDES)
    expected, sparse = _dense_point_codes(
        64, boxes, np.zeros(3, np.int32), valid, ignore, ranges, center_sampling=False,
        center_radius=1.5,
    )  # fmt: skip
    got = sparse(boxes, valid, ignore)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) >= {0, 1} and 2 not in got


def test_point_assigner_checks_its_ranges_and_arrays():
    with pytest.raises(ValueError, match=r"regress_ranges \(2, 2\) must be \[5, 2\]"):
        host_targets.PointAssigner(
            _feature_sizes(64), STRIDES, regress_ranges=np.zeros((2, 2)), center_sampling=False,
            center_radius=1.5,
        )  # fmt: skip
    sparse = host_targets.PointAssigner(
        _feature_sizes(64), STRIDES, regress_ranges=fcos_assign.tiny_object_regress_ranges(STRIDES),
        center_sampling=True, center_radius=1.5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="PointAssigner: valid"):
        sparse(np.zeros((3, 4), np.float32), np.ones(2, bool), np.zeros(3, bool))
