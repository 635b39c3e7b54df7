"""Anchor boxes of every feature-map cell (RetinaNet, Faster R-CNN's RPN), as numpy constants.

Anchor ordering, shared with the heads that predict per anchor: level by level in the order
given, row-major over the cells within a level (as ``points.fcos_points``), and within a cell
the K shapes of ``anchor_shapes`` (aspect-ratio major, scale minor). That is the order of
``prediction.reshape(B, h * w * K, D)`` for an NHWC prediction map [B, h, w, K * D].

Anchors are centred on the cell centres ((j + 0.5) * stride, (i + 0.5) * stride) px, the FCOS
points, so both families see the image symmetrically (mmdetection's default centres at
j * stride instead, half a cell up and left).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dfrdet_jax.ops.points import fcos_points


def anchor_shapes(
    stride: float,
    octave_base_scale: float,
    scales_per_octave: int,
    aspect_ratios: Sequence[float],
) -> np.ndarray:
    """(w, h) px of the K = len(aspect_ratios) * scales_per_octave anchors of a level.

    Size s_k = stride * octave_base_scale * 2^(k / scales_per_octave), k < scales_per_octave;
    aspect ratio r = h / w at constant area s^2: w = s / sqrt(r), h = s * sqrt(r).
    Returns float32 [K, 2], aspect-ratio major (all scales of the first ratio first).
    """
    if scales_per_octave < 1 or not aspect_ratios:
        raise ValueError(
            f"anchors need scales_per_octave >= 1 and at least one aspect ratio, got "
            f"{scales_per_octave} and {tuple(aspect_ratios)}"
        )
    if min(aspect_ratios) <= 0 or octave_base_scale <= 0:
        raise ValueError(
            f"anchor aspect ratios {tuple(aspect_ratios)} and octave_base_scale "
            f"{octave_base_scale} must be positive"
        )
    sizes = stride * octave_base_scale * 2.0 ** (np.arange(scales_per_octave) / scales_per_octave)
    root = np.sqrt(np.asarray(aspect_ratios, np.float64))[:, None]
    w, h = sizes[None, :] / root, sizes[None, :] * root
    return np.stack([w.reshape(-1), h.reshape(-1)], axis=-1).astype(np.float32)


def anchor_grid(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    *,
    octave_base_scale: float,
    scales_per_octave: int,
    aspect_ratios: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor of every level, in the order of the module docstring.

    Args:
      feature_sizes: [(h, w)] cells per level.
      strides: stride of each level, px.
      octave_base_scale, scales_per_octave, aspect_ratios: see ``anchor_shapes``.
    Returns:
      (anchors float32 [A, 4] xyxy px, level int32 [A]) with A = K * sum_l h_l * w_l.
    """
    boxes, levels = [], []
    for index, (centres, stride) in enumerate(
        zip(fcos_points(feature_sizes, strides), strides, strict=True)
    ):
        shapes = anchor_shapes(stride, octave_base_scale, scales_per_octave, aspect_ratios)
        half = 0.5 * shapes[None, :, :]  # [1, K, 2]
        centre = centres[:, None, :]  # [hw, 1, 2]
        level_boxes = np.concatenate([centre - half, centre + half], axis=-1).reshape(-1, 4)
        boxes.append(level_boxes.astype(np.float32))
        levels.append(np.full(len(level_boxes), index, np.int32))
    return np.concatenate(boxes), np.concatenate(levels)


def anchors_per_cell(scales_per_octave: int, aspect_ratios: Sequence[float]) -> int:
    """K, the number of anchors of one feature-map cell."""
    return scales_per_octave * len(aspect_ratios)
