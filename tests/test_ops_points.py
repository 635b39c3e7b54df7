"""The point grid: order and positions of every level's cell centres."""

import numpy as np

from dfrdet_jax.ops import points as P


def test_points_order_and_positions():
    pts = P.fcos_points([(2, 3), (1, 2)], [4, 8])
    np.testing.assert_allclose(pts[0], [[2, 2], [6, 2], [10, 2], [2, 6], [6, 6], [10, 6]])
    np.testing.assert_allclose(pts[1], [[4, 4], [12, 4]])
    flat, level = P.fcos_flat_points([(2, 3), (1, 2)], [4, 8])
    assert flat.shape == (8, 2) and flat.dtype == np.float32
    np.testing.assert_array_equal(level, [0, 0, 0, 0, 0, 0, 1, 1])
    # Same order as flattening an NHWC feature map: cell (i, j) -> i * w + j.
    grid = np.arange(6).reshape(2, 3)
    assert pts[0][grid[1, 2]].tolist() == [10, 6]
