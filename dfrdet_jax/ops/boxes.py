"""Box geometry as pure jnp functions.

Boxes are float32 (x1, y1, x2, y2) in pixels, x to the right, y down; a box covers
[x1, x2) x [y1, y2) in continuous coordinates, so width = x2 - x1 (no "+1").
Every function accepts arbitrary leading dimensions `...` unless stated otherwise and is
jit/vmap friendly (no data-dependent shapes).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# Default clamp for log-space width/height deltas: exp(4.135) = 1000/16, as Faster R-CNN.
DELTA_SCALE_CLAMP = math.log(1000.0 / 16.0)

# Added to denominators so that degenerate (zero-area) boxes give IoU 0 instead of NaN.
EPS = 1e-7


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of boxes [..., 4] (xyxy, px) -> [...] in px^2; negative extents count as 0."""
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def pairwise_intersection(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Intersection area of every box in boxes1 [N, 4] with every box in boxes2 [M, 4] ->
    [N, M] px^2."""
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """IoU of every box in boxes1 [N, 4] with every box in boxes2 [M, 4] -> [N, M] in [0, 1]."""
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / (union + EPS)


def _paired_iou_and_union(boxes1: jnp.ndarray, boxes2: jnp.ndarray):
    lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / (union + EPS), union


def paired_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """IoU of corresponding boxes: boxes1 [..., 4], boxes2 [..., 4] -> [...] in [0, 1]."""
    return _paired_iou_and_union(boxes1, boxes2)[0]


def paired_giou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Generalized IoU (Rezatofighi et al. 2019) of corresponding boxes -> [...] in [-1, 1].

    GIoU = IoU - (C - U) / C with C the area of the smallest enclosing box and U the union.
    """
    iou, union = _paired_iou_and_union(boxes1, boxes2)
    lt = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclose = box_area(jnp.concatenate([lt, rb], axis=-1))
    return iou - (enclose - union) / (enclose + EPS)


def xyxy_to_xywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """(x1, y1, x2, y2) -> (x1, y1, w, h), [..., 4] px."""
    return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """(x1, y1, w, h) -> (x1, y1, x2, y2), [..., 4] px."""
    return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """(x1, y1, x2, y2) -> (cx, cy, w, h), [..., 4] px."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return jnp.concatenate([boxes[..., :2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), [..., 4] px."""
    half = 0.5 * boxes[..., 2:]
    return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def clip_boxes(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
    """Clip boxes [..., 4] to the image [0, width] x [0, height] (px; scalars or [...] arrays)."""
    height = jnp.asarray(height, boxes.dtype)
    width = jnp.asarray(width, boxes.dtype)
    x = jnp.clip(boxes[..., 0::2], 0.0, width[..., None])
    y = jnp.clip(boxes[..., 1::2], 0.0, height[..., None])
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def ltrb_encode(points: jnp.ndarray, boxes: jnp.ndarray, stride=None) -> jnp.ndarray:
    """FCOS regression targets: distances from points to box edges.

    Args:
      points: [..., 2] (x, y) px.
      boxes: [..., 4] xyxy px (broadcast against points).
      stride: optional [...] or scalar; when given the distances are divided by it
        (the stride-normalised targets of FCOS with `norm_on_bbox`).
    Returns:
      [..., 4] (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y), px or px/stride; positive
      for points inside the box.
    """
    ltrb = jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)
    if stride is not None:
        ltrb = ltrb / jnp.asarray(stride, ltrb.dtype)[..., None]
    return ltrb


def ltrb_decode(points: jnp.ndarray, distances: jnp.ndarray, stride=None) -> jnp.ndarray:
    """Inverse of `ltrb_encode`: points [..., 2] px + distances [..., 4] -> boxes [..., 4] px.

    `stride` ([...] or scalar) multiplies the distances first when they are stride-normalised.
    """
    if stride is not None:
        distances = distances * jnp.asarray(stride, distances.dtype)[..., None]
    return jnp.concatenate([points - distances[..., :2], points + distances[..., 2:]], axis=-1)


def delta_encode(
    anchors: jnp.ndarray,
    boxes: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jnp.ndarray:
    """R-CNN/RetinaNet box deltas of boxes [..., 4] relative to anchors [..., 4] (xyxy px).

    dx = wx (gx - ax) / aw, dy = wy (gy - ay) / ah, dw = ww log(gw / aw), dh = wh log(gh / ah)
    with (x, y) the centres and (w, h) the sizes. Returns [..., 4] (dx, dy, dw, dh), unitless.
    Boxes and anchors must have positive width and height.
    """
    a = xyxy_to_cxcywh(anchors)
    g = xyxy_to_cxcywh(boxes)
    wx, wy, ww, wh = weights
    return jnp.stack(
        [
            wx * (g[..., 0] - a[..., 0]) / a[..., 2],
            wy * (g[..., 1] - a[..., 1]) / a[..., 3],
            ww * jnp.log(g[..., 2] / a[..., 2]),
            wh * jnp.log(g[..., 3] / a[..., 3]),
        ],
        axis=-1,
    )


def delta_decode(
    anchors: jnp.ndarray,
    deltas: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DELTA_SCALE_CLAMP,
) -> jnp.ndarray:
    """Inverse of `delta_encode`: anchors [..., 4] xyxy px + deltas [..., 4] -> boxes [..., 4] px.

    dw/dh (after dividing by their weights) are clamped to at most `scale_clamp` so that
    exp() cannot overflow for wild early predictions.
    """
    a = xyxy_to_cxcywh(anchors)
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    cx = a[..., 0] + dx * a[..., 2]
    cy = a[..., 1] + dy * a[..., 3]
    w = a[..., 2] * jnp.exp(dw)
    h = a[..., 3] * jnp.exp(dh)
    return cxcywh_to_xyxy(jnp.stack([cx, cy, w, h], axis=-1))


def centerness_target(ltrb: jnp.ndarray) -> jnp.ndarray:
    """FCOS centre-ness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of distances [..., 4] -> [...].

    Distances must be positive for a meaningful value (points inside their box); non-positive
    distances give 0 rather than NaN so that masked-out entries stay finite.
    """
    ltrb = jnp.maximum(ltrb, 0.0)
    lr = ltrb[..., 0::2]
    tb = ltrb[..., 1::2]
    ratio = (lr.min(-1) / jnp.maximum(lr.max(-1), EPS)) * (
        tb.min(-1) / jnp.maximum(tb.max(-1), EPS)
    )
    return jnp.sqrt(ratio)
