"""Row chunks: any chunk size, the padded last chunk included, gives the unchunked result."""

import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.ops import chunking


def _rows(points, boxes):
    """A row-wise function of two inputs: per row, its distance to every box and its label."""
    distance = jnp.abs(points[:, None, 0] - boxes[None, :, 0])  # [c, N]
    return {"nearest": distance.min(1), "twice_label": 2 * points[:, 1].astype(jnp.int32)}


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 100])
def test_map_in_chunks_equals_one_call(chunk_size):
    rng = np.random.default_rng(0)
    points = jnp.asarray(rng.uniform(0, 50, (23, 2)).astype(np.float32))
    labels = jnp.arange(23) % 5
    boxes = jnp.asarray(rng.uniform(0, 50, (6, 4)).astype(np.float32))

    def fn(p, label):
        return _rows(jnp.stack([p[:, 0], label.astype(jnp.float32)], 1), boxes)

    whole = fn(points, labels)
    got = chunking.map_in_chunks(fn, (points, labels), (-1e8, 0), chunk_size)
    for key in whole:
        np.testing.assert_array_equal(got[key], whole[key], err_msg=key)


def test_chunked_map_pads_the_last_chunk_with_its_values():
    out = chunking.chunked_map(lambda x: {"x": x}, (jnp.arange(5.0),), (-7.0,), 2)
    np.testing.assert_array_equal(out["x"], [[0, 1], [2, 3], [4, -7]])
    np.testing.assert_array_equal(chunking.unchunk(out, 5)["x"], np.arange(5.0))
