"""FCOS target assignment (Tian et al. 2019, as mmdetection's FCOSHead.get_targets): which
box each point of ``ops.points`` regresses, under per-level ranges of its regression distance
sized for tiny objects, with centre sampling and ignore regions.

Ground truth and labels follow ``ops.ground_truth``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dfrdet_jax.ops.boxes import box_area, centerness_target, ltrb_encode
from dfrdet_jax.ops.chunking import map_in_chunks
from dfrdet_jax.ops.ground_truth import first_index_of, split_ground_truth
from dfrdet_jax.ops.points import INF


def tiny_object_regress_ranges(strides: Sequence[int], multiple: float = 4.0) -> np.ndarray:
    """Per-level ranges [L, 2] (lo, hi) px for a point's max regression distance max(l,t,r,b).

    A point of level i may be assigned a box when lo_i <= max(l, t, r, b) <= hi_i, with
    hi_i = multiple * strides[i] (INF for the last level) and lo_i = hi_{i-1} (-1 for the
    first). Standard FCOS (P3..P7, strides 8..128) uses 8x the stride: (-1,64),(64,128),...,
    (512,INF), which puts every AI-TOD object (2-32 px, so max distance <= ~32 px) on P3.
    With P2..P6 (strides 4..64) and 4x the stride we get (-1,16),(16,32),(32,64),(64,128),
    (128,INF): a box of size s has max distance ~s/2..s at its points, so each level takes
    objects about 4-8x its stride: <= ~16-32 px objects go to P2, ~32-64 px to P3, and large
    DOTA objects still spread over the pyramid.
    """
    his = [multiple * s for s in strides[:-1]] + [INF]
    los = [-1.0] + his[:-1]
    return np.array(list(zip(los, his)), np.float32)


def _assign_chunk(
    points,
    level,
    ranges,
    strides,
    boxes,
    labels,
    positive_ok,
    ignore_ok,
    num_classes,
    center_sampling,
    center_radius,
):
    """Assignment for one chunk: points [c, 2], level [c] -> dict of [c, ...] targets."""
    ltrb = ltrb_encode(points[:, None, :], boxes[None, :, :])  # [c, N, 4]
    inside_box = ltrb.min(-1) > 0
    if center_sampling:
        # Centre region of radius * stride around the box centre, clipped to the box.
        radius = (strides[level] * center_radius)[:, None, None]  # [c, 1, 1]
        centre = 0.5 * (boxes[None, :, :2] + boxes[None, :, 2:])  # [1, N, 2]
        region = jnp.concatenate(
            [
                jnp.maximum(centre - radius, boxes[None, :, :2]),
                jnp.minimum(centre + radius, boxes[None, :, 2:]),
            ],
            axis=-1,
        )
        inside = ltrb_encode(points[:, None, :], region).min(-1) > 0
    else:
        inside = inside_box
    max_dist = ltrb.max(-1)
    lo = ranges[level, 0][:, None]
    hi = ranges[level, 1][:, None]
    candidate = inside & (max_dist >= lo) & (max_dist <= hi) & positive_ok[None, :]

    areas = jnp.where(candidate, box_area(boxes)[None, :], jnp.inf)
    gt_index = first_index_of(areas, areas.min(axis=1))  # ties -> lower index
    positive = candidate.any(axis=1)
    ignore = ~positive & (inside_box & ignore_ok[None, :]).any(axis=1)

    box_targets = jnp.where(positive[:, None], boxes[gt_index], 0.0)
    ltrb_targets = jnp.where(
        positive[:, None], jnp.take_along_axis(ltrb, gt_index[:, None, None], axis=1)[:, 0], 0.0
    )
    return dict(
        labels=jnp.where(positive, labels[gt_index], num_classes).astype(jnp.int32),
        box_targets=box_targets,
        ltrb_targets=ltrb_targets,
        centerness=jnp.where(positive, centerness_target(ltrb_targets), 0.0),
        positive=positive,
        ignore=ignore,
        gt_index=jnp.where(positive, gt_index, -1).astype(jnp.int32),
    )


def fcos_targets(
    points: jnp.ndarray,
    level_of_point: jnp.ndarray,
    regress_ranges: jnp.ndarray,
    strides,
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_ignore: jnp.ndarray,
    num_classes: int,
    *,
    center_sampling: bool,
    center_radius: float,
    chunk_size: int | None,
) -> dict[str, jnp.ndarray]:
    """FCOS targets of one image (vmap over the gt arguments for a batch).

    A point is a candidate for a ground-truth box when it lies strictly inside the box (with
    `center_sampling`: strictly inside the box's centre region, the square of half-size
    center_radius * stride of the point's level around the box centre, clipped to the box)
    and max(l, t, r, b) of its distances to that box lies in its level's range
    lo <= d <= hi. Among its candidates a point takes the box of smallest area (ties: lower
    box index). Only boxes with gt_valid & ~gt_ignore can be assigned. A point that is not
    positive but lies strictly inside an ignore region (gt_valid & gt_ignore) is `ignore`:
    it should be left out of the classification loss.

    Memory: the [P, N] assignment is computed in chunks of `chunk_size` points with
    lax.map, so peak memory is ~ chunk_size * N * 4 floats (4096 x 1500: ~100 MB) instead
    of P * N; `chunk_size=None` uses a single chunk.

    Args:
      points: float32 [P, 2] (x, y) px, from ``ops.points.fcos_flat_points``.
      level_of_point: int [P] level index of every point.
      regress_ranges: float32 [L, 2] (lo, hi) px, e.g. ``tiny_object_regress_ranges``.
      strides: [L] stride of every level, px.
      gt_boxes: float32 [N, 4] xyxy px.
      gt_labels: int [N] class in [0, num_classes).
      gt_valid: bool [N]; False rows (padding) are ignored entirely.
      gt_ignore: bool [N]; True rows are ignore regions, never positives.
      num_classes: C; the background label.
    Returns dict of:
      labels       int32 [P]     class of the assigned box, `num_classes` when not positive
      box_targets  float32 [P, 4] xyxy px of the assigned box, 0 when not positive
      ltrb_targets float32 [P, 4] (l, t, r, b) px to the assigned box, 0 when not positive
      centerness   float32 [P]   centre-ness target of ltrb_targets, 0 when not positive
      positive     bool [P]
      ignore       bool [P]      inside an ignore region and not positive
      gt_index     int32 [P]     index of the assigned box, -1 when not positive
    """
    num_points = points.shape[0]
    if level_of_point.shape != (num_points,):
        raise ValueError(
            f"fcos_targets: level_of_point {level_of_point.shape} does not match points "
            f"{points.shape}"
        )
    gt_boxes, gt_labels, positive_ok, ignore_ok = split_ground_truth(
        "fcos_targets", gt_boxes, gt_labels, gt_valid, gt_ignore
    )
    ranges = jnp.asarray(regress_ranges, jnp.float32)
    strides = jnp.asarray(strides, jnp.float32)
    if ranges.shape != (strides.shape[0], 2):
        raise ValueError(
            f"fcos_targets: regress_ranges {ranges.shape} must be "
            f"[{strides.shape[0]}, 2], one per stride"
        )

    def assign(pts, lvl):
        return _assign_chunk(
            pts,
            lvl,
            ranges,
            strides,
            gt_boxes,
            gt_labels,
            positive_ok,
            ignore_ok,
            num_classes,
            center_sampling,
            center_radius,
        )

    # Padded points sit at level 0 far outside the image; they are cut off again.
    return map_in_chunks(assign, (points, level_of_point), (-INF, 0), chunk_size)
