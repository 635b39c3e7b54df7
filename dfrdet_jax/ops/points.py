"""The point grid: the centre of every feature-map cell of every level (FCOS's points, and the
centres of ``ops.anchors``'s anchors).

Point ordering, shared with the heads: level by level in the order given (P2 first), and within
a level row-major over the feature map (row i = y outer, column j = x inner), i.e. the order of
``feature.reshape(h * w, C)`` for an NHWC feature map [h, w, C]. A point sits at the centre of
its cell: (x, y) = ((j + 0.5) * stride, (i + 0.5) * stride) px. For even strides this equals
mmdetection's ``j * stride + stride // 2``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# A distance beyond any image, px: the open end of the last FCOS regression range, and where the
# padding rows of chunked points and anchors sit (so that they match nothing).
INF = 1e8


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
