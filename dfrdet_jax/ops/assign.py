"""Target assignment as pure jnp functions: FCOS points (Tian et al. 2019, as mmdetection's
FCOSHead.get_targets) and max-IoU anchor matching (RetinaNet, as detectron2's Matcher).

Point ordering, shared with the FCOS head: level by level in the order given (P2 first),
and within a level row-major over the feature map (row i = y outer, column j = x inner),
i.e. the order of `feature.reshape(h * w, C)` for an NHWC feature map [h, w, C].
A point sits at the centre of its cell: (x, y) = ((j + 0.5) * stride, (i + 0.5) * stride) px.
For even strides this equals mmdetection's `j * stride + stride // 2`. Anchors: see
`dfrdet_jax.ops.anchors`.

Label convention: labels are in [0, num_classes) for positives and `num_classes` for
background (and for ignored points); `losses.focal` reads any label outside
[0, num_classes) as background.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax.ops.boxes import (
    box_area,
    centerness_target,
    ltrb_encode,
    pairwise_intersection,
    pairwise_iou,
)

# Upper bound of the last level's regression range ("infinity").
INF = 1e8
# IoUs this close to a box's best count as its best (max-IoU matching's low-quality matches).
_TIE_TOLERANCE = 1e-6


def fcos_points(
    feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int]
) -> list[np.ndarray]:
    """Centres of the feature-map cells of every level.

    Args:
      feature_sizes: [(h, w)] per level, in cells.
      strides: stride of every level, px.
    Returns:
      list of float32 numpy arrays [h * w, 2] of (x, y) px, row-major (see module doc).
      They are static constants: computing them on the host keeps them out of the trace.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(
            f"fcos_points: {len(feature_sizes)} feature sizes but {len(strides)} strides"
        )
    points = []
    for (h, w), s in zip(feature_sizes, strides):
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xy = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)
        points.append(((xy + 0.5) * s).astype(np.float32))
    return points


def fcos_flat_points(
    feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """All levels' points concatenated: (points float32 [P, 2] px, level int32 [P])."""
    points = fcos_points(feature_sizes, strides)
    level = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(points)])
    return np.concatenate(points, axis=0), level


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


# For P2..P6 with strides (4, 8, 16, 32, 64).
DEFAULT_TINY_REGRESS_RANGES = tiny_object_regress_ranges((4, 8, 16, 32, 64))


def _ground_truth(caller: str, gt_boxes, gt_labels, gt_valid, gt_ignore):
    """Checked ground truth of one image: (boxes float32 [N', 4], labels [N'], positive_ok [N'],
    ignore_ok [N']) with N' = max(N, 1): an image without rows gets one invalid padding row,
    because argmin/argmax need at least one column. positive_ok = valid & ~ignore (boxes that
    can be assigned), ignore_ok = valid & ignore (ignore regions)."""
    num_gt = gt_boxes.shape[0]
    for name, arr in (("gt_labels", gt_labels), ("gt_valid", gt_valid), ("gt_ignore", gt_ignore)):
        if arr.shape != (num_gt,):
            raise ValueError(
                f"{caller}: {name} {arr.shape} does not match gt_boxes {gt_boxes.shape}"
            )
    if num_gt == 0:
        gt_boxes, gt_labels = jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32)
        gt_valid, gt_ignore = jnp.zeros((1,), bool), jnp.zeros((1,), bool)
    return gt_boxes.astype(jnp.float32), gt_labels, gt_valid & ~gt_ignore, gt_valid & gt_ignore


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
    gt_index = jnp.argmin(areas, axis=1)  # first minimum -> lower index on ties
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
    center_sampling: bool = True,
    center_radius: float = 1.5,
    chunk_size: int | None = 4096,
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
      points: float32 [P, 2] (x, y) px, from `fcos_flat_points`.
      level_of_point: int [P] level index of every point.
      regress_ranges: float32 [L, 2] (lo, hi) px, e.g. DEFAULT_TINY_REGRESS_RANGES.
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
    gt_boxes, gt_labels, positive_ok, ignore_ok = _ground_truth(
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


def chunked_map(fn, inputs, pad_values, chunk_size: int | None):
    """``jax.lax.map(fn, ...)`` over row chunks of ``inputs``, to bound the memory of ``fn``.

    inputs: arrays sharing the leading size P, cut into ceil(P / c) chunks of c =
    min(chunk_size, P) rows (``None``: one chunk); the last chunk is padded with ``pad_values``
    (one per input). fn(*chunk) -> a pytree; returns that pytree with a leading chunk axis.
    """
    num = inputs[0].shape[0]
    chunk = num if chunk_size is None else min(chunk_size, num)
    num_chunks = -(-num // chunk)
    pad = num_chunks * chunk - num
    chunked = tuple(
        jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value).reshape(
            (num_chunks, chunk) + x.shape[1:]
        )
        for x, value in zip(inputs, pad_values, strict=True)
    )
    if num_chunks == 1:
        return jax.tree.map(lambda v: v[None], fn(*(x[0] for x in chunked)))
    return jax.lax.map(lambda xs: fn(*xs), chunked)


def unchunk(tree, num: int):
    """A ``chunked_map`` result of row-wise outputs [num_chunks, c, ...] -> its first ``num``
    rows [num, ...], the padding cut off."""
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:])[:num], tree)


def map_in_chunks(fn, inputs, pad_values, chunk_size: int | None):
    """``fn(*inputs)`` for a row-wise ``fn`` (row i of every output depends on row i of the
    inputs only), computed ``chunk_size`` rows at a time; see ``chunked_map``."""
    return unchunk(chunked_map(fn, inputs, pad_values, chunk_size), inputs[0].shape[0])


def check_iou_thresholds(
    negative_iou: float,
    positive_iou: float,
    where: str,
    names: tuple[str, str] = ("negative_iou", "positive_iou"),
) -> None:
    """ValueError (naming ``where`` and the two settings ``names``) unless
    0 <= negative_iou <= positive_iou <= 1, as ``max_iou_targets`` needs."""
    if not 0.0 <= negative_iou <= positive_iou <= 1.0:
        raise ValueError(
            f"{where} needs 0 <= {names[0]} <= {names[1]} <= 1, got {negative_iou} and "
            f"{positive_iou}"
        )


def max_iou_targets(
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_ignore: jnp.ndarray,
    num_classes: int,
    *,
    positive_iou: float = 0.5,
    negative_iou: float = 0.4,
    low_quality_matches: bool = True,
    ignore_iof: float = 0.5,
    chunk_size: int | None = 16384,
) -> dict[str, jnp.ndarray]:
    """Max-IoU anchor assignment of one image (RetinaNet; as detectron2's Matcher and
    mmdetection's MaxIoUAssigner); vmap over the gt arguments for a batch.

    Every anchor is matched to the assignable box (gt_valid & ~gt_ignore) it overlaps most
    (IoU, ties to the lower box index) and is
      positive    when that IoU >= positive_iou, or, with ``low_quality_matches``, when it is a
                  best anchor (highest IoU > 0, ties within 1e-6 included) of some box: so every
                  box, even one too small for any anchor to reach positive_iou (common for 2-8 px
                  objects), gets at least one positive anchor. Such an anchor keeps its own
                  best-IoU box as target (detectron2's rule);
      background  when that IoU < negative_iou and the anchor is not positive and not covered by
                  an ignore region;
      ignore      otherwise: IoU in [negative_iou, positive_iou), or covered by an ignore region
                  (gt_valid & gt_ignore) with intersection / anchor area >= ``ignore_iof``.

    Memory: the [A, N] overlaps are computed ``chunk_size`` anchors at a time, twice (once for
    each box's best IoU, once to find the anchors reaching it), ~chunk_size * N * 4 floats.

    Args:
      anchors: float32 [A, 4] xyxy px (``anchors.anchor_grid``).
      gt_boxes: float32 [N, 4] xyxy px; gt_labels int [N] in [0, num_classes);
      gt_valid: bool [N], False rows are padding; gt_ignore: bool [N], ignore regions.
      num_classes: C; the background label.
    Returns dict of:
      labels       int32 [A]     class of the matched box when positive, else ``num_classes``
      box_targets  float32 [A, 4] matched box when positive, else the anchor itself (so that
                                 delta targets stay finite)
      positive     bool [A]
      ignore       bool [A]      neither positive nor background: leave out of the class loss
      gt_index     int32 [A]     matched box when positive, else -1
      max_iou      float32 [A]   IoU with the matched box (-1 when there is none)
    """
    check_iou_thresholds(negative_iou, positive_iou, "max_iou_targets")
    gt_boxes, gt_labels, positive_ok, ignore_ok = _ground_truth(
        "max_iou_targets", gt_boxes, gt_labels, gt_valid, gt_ignore
    )
    anchors = anchors.astype(jnp.float32)

    def overlaps(chunk):  # [c, N], -1 for boxes that cannot be matched
        return jnp.where(positive_ok[None, :], pairwise_iou(chunk, gt_boxes), -1.0)

    def best_match(chunk):
        iou = overlaps(chunk)
        iof = pairwise_intersection(chunk, gt_boxes) / jnp.maximum(box_area(chunk), 1e-6)[:, None]
        return {
            "max_iou": iou.max(axis=1),
            "gt_index": jnp.argmax(iou, axis=1).astype(jnp.int32),
            "in_ignore": ((iof >= ignore_iof) & ignore_ok[None, :]).any(axis=1),
            "box_best": iou.max(axis=0),  # per box: its best IoU within this chunk
        }

    # Padded anchors are empty boxes far outside the image: IoU 0 with everything.
    pad = (-INF,)
    out = chunked_map(best_match, (anchors,), pad, chunk_size)
    box_best = out.pop("box_best").max(axis=0)  # [N], over all anchors
    match = unchunk(out, anchors.shape[0])
    positive = match["max_iou"] >= positive_iou
    if low_quality_matches:
        reachable = positive_ok & (box_best > 0)

        def is_best_anchor(chunk):
            # A tolerance, as the second pass recomputes the overlaps (its rounding may differ).
            ties = overlaps(chunk) >= box_best[None, :] - _TIE_TOLERANCE
            return {"best": (ties & reachable[None, :]).any(axis=1)}

        positive |= map_in_chunks(is_best_anchor, (anchors,), pad, chunk_size)["best"]
    background = ~positive & (match["max_iou"] < negative_iou) & ~match["in_ignore"]
    gt_index = match["gt_index"]
    return {
        "labels": jnp.where(positive, gt_labels[gt_index], num_classes).astype(jnp.int32),
        "box_targets": jnp.where(positive[:, None], gt_boxes[gt_index], anchors),
        "positive": positive,
        "ignore": ~positive & ~background,
        "gt_index": jnp.where(positive, gt_index, -1).astype(jnp.int32),
        "max_iou": match["max_iou"],
    }
