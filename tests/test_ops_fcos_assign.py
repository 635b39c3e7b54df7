"""FCOS regression ranges and targets: hand-worked cases, a numpy reference, chunking, padding
slots and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.ops import fcos_assign as A
from dfrdet_jax.ops.points import INF, fcos_flat_points

C = 5  # classes; background label = C


def test_regress_ranges():
    np.testing.assert_allclose(
        A.tiny_object_regress_ranges((4, 8, 16, 32, 64)),
        [[-1, 16], [16, 32], [32, 64], [64, 128], [128, INF]],
    )
    np.testing.assert_allclose(A.tiny_object_regress_ranges([8, 16], 8.0), [[-1, 64], [64, INF]])


@pytest.mark.parametrize("arg", ["synthetic,dfr", "synthetic,dfr,smoke"])
def test_the_config_ranges_are_the_tiny_object_ranges_of_its_levels(load_config, arg):
    config = load_config(arg)
    strides = [2**level for level in range(config.model.min_level, config.model.max_level + 1)]
    np.testing.assert_allclose(config.fcos.regress_ranges, A.tiny_object_regress_ranges(strides))


fcos_targets_jit = jax.jit(
    A.fcos_targets,
    static_argnames=("num_classes", "center_sampling", "center_radius", "chunk_size"),
)


def targets(points, level, ranges, strides, boxes, labels, valid=None, ignore=None, **kw):
    """fcos_targets with numpy outputs; config.fcos's settings unless ``kw`` sets them."""
    kw = {"center_sampling": True, "center_radius": 1.5, "chunk_size": 4096, **kw}
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    ignore = np.zeros(n, bool) if ignore is None else np.asarray(ignore)
    out = fcos_targets_jit(
        points,
        level,
        np.asarray(ranges, np.float32),
        np.asarray(strides, np.float32),
        np.asarray(boxes, np.float32),
        np.asarray(labels, np.int32),
        valid,
        ignore,
        num_classes=C,
        **kw,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def one_level(h=4, w=4, stride=8):
    points, level = fcos_flat_points([(h, w)], [stride])
    return points, level, np.array([[-1.0, INF]]), [stride]


def grid_of(flags, h=4, w=4):
    return np.asarray(flags).reshape(h, w).astype(int)


def test_inside_box_without_center_sampling():
    points, level, ranges, strides = one_level()  # points at 4, 12, 20, 28
    out = targets(points, level, ranges, strides, [[0, 0, 16, 12]], [2], center_sampling=False)
    expected = np.zeros((4, 4), int)
    expected[0, :2] = 1  # y=4 rows; y=12 lies on the box edge: not strictly inside
    np.testing.assert_array_equal(grid_of(out["positive"]), expected)
    np.testing.assert_array_equal(out["labels"], np.where(expected.ravel() == 1, 2, C))
    # Point (12, 4): l, t, r, b = 12, 4, 4, 8.
    np.testing.assert_allclose(out["ltrb_targets"][1], [12, 4, 4, 8])
    np.testing.assert_allclose(out["box_targets"][1], [0, 0, 16, 12])
    np.testing.assert_allclose(out["centerness"][1], np.sqrt(4 / 12 * 4 / 8), rtol=1e-6)
    assert out["gt_index"][1] == 0 and out["gt_index"][2] == -1
    assert not out["ltrb_targets"][2].any() and out["centerness"][2] == 0


def test_center_sampling_region():
    points, level, ranges, strides = one_level()
    box = [[0, 0, 32, 32]]
    full = targets(points, level, ranges, strides, box, [0], center_sampling=False)
    assert full["positive"].all()
    # Centre (16, 16), radius 1.5 * 8 = 12 -> region (4, 28) exclusive: points 12 and 20.
    centre = targets(points, level, ranges, strides, box, [0], center_radius=1.5)
    expected = np.zeros((4, 4), int)
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(grid_of(centre["positive"]), expected)
    # The region is clipped to the box: a wide radius cannot reach outside a small box.
    small = targets(points, level, ranges, strides, [[8, 8, 16, 16]], [0], center_radius=5.0)
    np.testing.assert_array_equal(np.flatnonzero(small["positive"]), [5])  # point (12, 12)


def test_level_ranges():
    # Level 0 stride 4 (2x2 cells), level 1 stride 8 (1x1 cell); ranges split at 6 px.
    points, level = fcos_flat_points([(2, 2), (1, 1)], [4, 8])
    ranges = np.array([[-1, 6], [6, INF]])
    # Box [0,0,8,8]: level-0 points have max distance 6 (in range, hi inclusive), the
    # level-1 point (4, 4) has max distance 4 < 6.
    out = targets(points, level, ranges, [4, 8], [[0, 0, 8, 8]], [1], center_sampling=False)
    np.testing.assert_array_equal(out["positive"], [1, 1, 1, 1, 0])
    # Box [0,0,8,12] : max distances become 10, 10, 6, 6 and 8 for the level-1 point.
    out = targets(points, level, ranges, [4, 8], [[0, 0, 8, 12]], [1], center_sampling=False)
    np.testing.assert_array_equal(out["positive"], [0, 0, 1, 1, 1])


def test_smallest_area_wins_and_ties_take_lower_index():
    points, level, ranges, strides = one_level()
    boxes = [[0, 0, 32, 32], [0, 0, 16, 16], [0, 0, 16, 16], [8, 8, 24, 24]]
    out = targets(points, level, ranges, strides, boxes, [0, 1, 2, 3], center_sampling=False)
    g = out["gt_index"].reshape(4, 4)
    assert g[0, 0] == 1  # in boxes 0, 1, 2: 1 and 2 tie on area -> index 1
    assert g[1, 1] == 1  # (12,12) in 0, 1, 2, 3: 1, 2, 3 tie -> index 1
    assert g[2, 2] == 3  # (20,20) in 0 and 3 -> smaller 3
    assert g[3, 3] == 0  # (28,28) only in 0
    np.testing.assert_array_equal(out["labels"].reshape(4, 4)[[0, 2, 3], [0, 2, 3]], [1, 3, 0])


def test_ignore_regions_and_padding():
    points, level, ranges, strides = one_level()
    boxes = [[0, 0, 16, 16], [8, 0, 32, 16], [0, 0, 32, 32]]
    valid = [True, True, False]  # the padded row covers the image but must do nothing
    ignore = [False, True, False]
    out = targets(
        points, level, ranges, strides, boxes, [4, 0, 1], valid, ignore, center_sampling=False
    )
    pos = np.zeros((4, 4), int)
    pos[:2, :2] = 1
    ign = np.zeros((4, 4), int)
    ign[:2, 2:] = 1  # inside the ignore region but not positive; (12, y) stays positive
    np.testing.assert_array_equal(grid_of(out["positive"]), pos)
    np.testing.assert_array_equal(grid_of(out["ignore"]), ign)
    assert set(out["labels"][out["positive"]]) == {4}
    assert np.all(out["labels"][~out["positive"]] == C)


def test_no_ground_truth():
    points, level, ranges, strides = one_level()
    out = targets(points, level, ranges, strides, np.zeros((0, 4)), np.zeros(0))
    assert not out["positive"].any() and not out["ignore"].any()
    assert np.all(out["labels"] == C) and out["box_targets"].shape == (16, 4)


def np_reference(points, level, ranges, strides, boxes, labels, valid, ignore, radius):
    """Plain-loop FCOS assignment with centre sampling (labels, gt index, ignore)."""
    lab = np.full(len(points), C)
    idx = np.full(len(points), -1)
    ign = np.zeros(len(points), bool)
    for p, (x, y) in enumerate(points):
        best = None
        for n, (x1, y1, x2, y2) in enumerate(boxes):
            if not valid[n]:
                continue
            inside_box = min(x - x1, y - y1, x2 - x, y2 - y) > 0
            if ignore[n]:
                ign[p] |= inside_box
                continue
            r = radius * strides[level[p]]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            rx1, ry1, rx2, ry2 = max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2)
            inside = min(x - rx1, y - ry1, rx2 - x, ry2 - y) > 0
            d = max(x - x1, y - y1, x2 - x, y2 - y)
            lo, hi = ranges[level[p]]
            area = (x2 - x1) * (y2 - y1)
            if inside and lo <= d <= hi and (best is None or area < best[0]):
                best = (area, n)
        if best is not None:
            idx[p], lab[p], ign[p] = best[1], labels[best[1]], False
    return lab, idx, ign


def random_gts(rng, n, size=64):
    xy = rng.uniform(-4, size, (n, 2))
    wh = rng.choice([2.0, 4.0, 8.0, 16.0, 40.0], (n, 2)) + rng.uniform(0, 3, (n, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    return (
        boxes,
        rng.integers(0, C, n).astype(np.int32),
        rng.uniform(size=n) > 0.15,
        rng.uniform(size=n) > 0.85,
    )


SIZES, STRIDES = [(16, 16), (8, 8), (4, 4)], [4, 8, 16]


def test_matches_numpy_reference_and_chunking():
    points, level = fcos_flat_points(SIZES, STRIDES)  # P = 336
    ranges = A.tiny_object_regress_ranges(STRIDES)
    rng = np.random.default_rng(0)
    boxes, labels, valid, ignore = random_gts(rng, 24)
    kw = dict(center_radius=1.5)
    whole = targets(
        points, level, ranges, STRIDES, boxes, labels, valid, ignore, chunk_size=None, **kw
    )
    chunked = targets(
        points, level, ranges, STRIDES, boxes, labels, valid, ignore, chunk_size=100, **kw
    )  # 4 chunks, the last one padded
    # 40 more padding slots (what a batch cut to fewer box slots leaves out) change nothing.
    padded = targets(
        points,
        level,
        ranges,
        STRIDES,
        np.pad(boxes, ((0, 40), (0, 0))),
        np.pad(labels, (0, 40), constant_values=-1),
        np.pad(valid, (0, 40)),
        np.pad(ignore, (0, 40)),
        chunk_size=None,
        **kw,
    )
    for k in whole:
        np.testing.assert_array_equal(whole[k], chunked[k], err_msg=k)
        np.testing.assert_array_equal(whole[k], padded[k], err_msg=k)
    lab, idx, ign = np_reference(
        points, level, ranges, STRIDES, boxes.astype(np.float64), labels, valid, ignore, 1.5
    )
    assert 10 < whole["positive"].sum() and whole["ignore"].any()
    np.testing.assert_array_equal(whole["labels"], lab)
    np.testing.assert_array_equal(whole["gt_index"], idx)
    np.testing.assert_array_equal(whole["ignore"], ign)
    pos = idx >= 0
    np.testing.assert_allclose(whole["box_targets"][pos], boxes[idx[pos]])
    ltrb = np.concatenate([points[pos] - boxes[idx[pos], :2], boxes[idx[pos], 2:] - points[pos]], 1)
    np.testing.assert_allclose(whole["ltrb_targets"][pos], ltrb, rtol=1e-6, atol=1e-5)


def test_jit_vmap_over_batch():
    points, level = fcos_flat_points(SIZES, STRIDES)
    ranges = A.tiny_object_regress_ranges(STRIDES)
    rng = np.random.default_rng(1)
    batch = [random_gts(rng, 10) for _ in range(2)]
    stacked = [jnp.asarray(np.stack(x)) for x in zip(*batch)]
    fn = jax.jit(
        jax.vmap(
            lambda boxes, labels, valid, ignore: A.fcos_targets(
                points,
                level,
                ranges,
                STRIDES,
                boxes,
                labels,
                valid,
                ignore,
                C,
                center_sampling=True,
                center_radius=1.5,
                chunk_size=128,
            )
        )
    )
    out = fn(*stacked)
    assert out["labels"].shape == (2, len(points))
    assert out["box_targets"].shape == (2, len(points), 4)
    for b, gts in enumerate(batch):
        single = targets(points, level, ranges, STRIDES, *gts, chunk_size=None)
        for k in single:
            np.testing.assert_array_equal(np.asarray(out[k][b]), single[k], err_msg=k)


def test_rejects_mismatched_shapes():
    points, level, ranges, strides = one_level()
    with pytest.raises(ValueError, match="gt_labels"):
        A.fcos_targets(
            points,
            level,
            ranges,
            strides,
            jnp.zeros((3, 4)),
            jnp.zeros(2, int),
            jnp.ones(3, bool),
            jnp.zeros(3, bool),
            C,
            center_sampling=True,
            center_radius=1.5,
            chunk_size=None,
        )
