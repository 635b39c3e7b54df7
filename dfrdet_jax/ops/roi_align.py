"""RoIAlign (He et al. 2017) over a feature pyramid, as a pure jnp function with static shapes.

Each region of interest is pooled from one pyramid level (``roi_levels``) into an
``output_size x output_size`` grid: every bin averages ``sampling_ratio^2`` bilinear samples at
regularly spaced points, as torchvision's ``roi_align(..., aligned=True)``: a box (x1, y1, x2, y2)
px maps to feature coordinates (x / stride - 0.5), so that a feature cell's value sits at its
centre; a sample more than one cell outside the map reads 0, one within a cell of the border reads
the border (clamped), as the reference implementations do.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def roi_levels(
    rois: jnp.ndarray,
    min_level: int,
    max_level: int,
    *,
    canonical_level: int,
    canonical_size: float = 224.0,
) -> jnp.ndarray:
    """FPN level of each RoI (Lin et al. 2017, Eq. 1): floor(k0 + log2(sqrt(w h) / 224)),
    k0 = ``canonical_level`` (the level of a ``canonical_size`` px RoI), clamped to
    [min_level, max_level]; rois [R, 4] xyxy px -> int32 [R] levels.

    With k0 = 4 every RoI under 112 px (all of AI-TOD's tiny objects) reads P2 (min_level 2).
    """
    size = jnp.sqrt(jnp.maximum((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]), 1e-6))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(
    levels: Sequence[jnp.ndarray],
    strides: Sequence[int],
    rois: jnp.ndarray,
    level_index: jnp.ndarray,
    output_size: int,
    sampling_ratio: int,
) -> jnp.ndarray:
    """Pools the RoIs of one image from its pyramid.

    Args:
      levels: L feature maps [h_l, w_l, C] of one image.
      strides: stride of each map, px.
      rois: float [R, 4] xyxy px of the input image.
      level_index: int [R], position in ``levels`` each RoI reads (e.g. ``roi_levels`` minus
        the first level's number).
      output_size: S, bins per side.
      sampling_ratio: bilinear samples per bin side (> 0).
    Returns:
      [R, S, S, C] in the maps' dtype.
    """
    if sampling_ratio < 1:
        raise ValueError(f"roi_align: sampling_ratio must be >= 1, got {sampling_ratio}")
    if len(levels) != len(strides):
        raise ValueError(f"roi_align: {len(levels)} maps but {len(strides)} strides")
    channels = levels[0].shape[-1]
    # One flat table of every level's cells: a RoI's samples index into its own level's slice.
    flat = jnp.concatenate([x.reshape(-1, channels) for x in levels], axis=0)
    sizes = jnp.asarray([x.shape[:2] for x in levels], jnp.int32)  # [L, 2] (h, w)
    offsets = jnp.asarray([0] + [int(math.prod(x.shape[:2])) for x in levels[:-1]], jnp.int32)
    offsets = jnp.cumsum(offsets)
    scale = 1.0 / jnp.asarray(strides, jnp.float32)

    level_index = level_index.astype(jnp.int32)
    h, w = sizes[level_index, 0], sizes[level_index, 1]  # [R]
    box = rois.astype(jnp.float32) * scale[level_index][:, None] - 0.5  # aligned: cell centres
    n = output_size * sampling_ratio
    # Sample positions: bin b, sample s -> start + (b + (s + 0.5) / ratio) * bin size.
    frac = (jnp.arange(n, dtype=jnp.float32) + 0.5) / sampling_ratio  # [n]
    ys = box[:, 1:2] + frac[None, :] * (box[:, 3:4] - box[:, 1:2]) / output_size  # [R, n]
    xs = box[:, 0:1] + frac[None, :] * (box[:, 2:3] - box[:, 0:1]) / output_size  # [R, n]

    def corners(coord, limit):
        """Clamped low/high indices and weights of 1-d bilinear interpolation; [R, n] each."""
        inside = (coord >= -1.0) & (coord <= limit[:, None].astype(jnp.float32))
        coord = jnp.maximum(coord, 0.0)
        low = jnp.minimum(jnp.floor(coord).astype(jnp.int32), limit[:, None] - 1)
        high = jnp.minimum(low + 1, limit[:, None] - 1)
        coord = jnp.where(low >= limit[:, None] - 1, low.astype(jnp.float32), coord)
        high_weight = coord - low.astype(jnp.float32)
        return low, high, 1.0 - high_weight, high_weight, inside

    y_lo, y_hi, wy_lo, wy_hi, y_in = corners(ys, h)
    x_lo, x_hi, wx_lo, wx_hi, x_in = corners(xs, w)
    base = offsets[level_index][:, None, None]  # [R, 1, 1]
    width = w[:, None, None]
    out = 0.0
    for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            index = base + yi[:, :, None] * width + xi[:, None, :]  # [R, n, n]
            weight = wy[:, :, None] * wx[:, None, :] * (y_in[:, :, None] & x_in[:, None, :])
            out = out + flat[index] * weight[..., None].astype(flat.dtype)
    r = rois.shape[0]
    out = out.reshape(r, output_size, sampling_ratio, output_size, sampling_ratio, channels)
    return out.mean(axis=(2, 4)).astype(levels[0].dtype)


def batched_roi_align(levels, strides, rois, level_index, output_size, sampling_ratio):
    """``multilevel_roi_align`` over a batch: levels [B, h_l, w_l, C], rois [B, R, 4],
    level_index [B, R] -> [B, R, S, S, C]."""
    return jax.vmap(
        lambda maps, boxes, index: multilevel_roi_align(
            maps, strides, boxes, index, output_size, sampling_ratio
        )
    )(list(levels), rois, level_index)
