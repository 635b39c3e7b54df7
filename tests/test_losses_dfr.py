"""Foreground mask and DFR loss against hand-made masks and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrdet_jax.losses.dfr import dfr_loss, foreground_mask


def np_mask(boxes, select, h, w):
    m = np.zeros((h, w), np.float32)
    for (x1, y1, x2, y2), s in zip(boxes, select):
        for i in range(h):
            for j in range(w):
                if s and x1 <= j + 0.5 < x2 and y1 <= i + 0.5 < y2:
                    m[i, j] = 1
    return m


BOXES = np.array(
    [
        [1, 1, 3, 4],
        [2, 2, 5, 3],
        [0.5, 5, 1.5, 7.2],
        [4, 4, 8, 6],
        [0, 0, 8, 8],
        [6.6, 0.2, 6.9, 9],
    ],
    np.float32,
)
VALID = np.array([True, True, True, True, False, True])
IGNORE = np.array([False, False, False, True, False, False])


def test_mask_by_hand():
    fg, ign = foreground_mask(jnp.asarray(BOXES), VALID, IGNORE, 8, 9)
    expected = np.zeros((8, 9), int)
    expected[1:4, 1:3] = 1  # box 0
    expected[2, 2:5] = 1  # box 1, overlapping box 0
    expected[5:7, 0] = 1  # box 2: centre x 0.5 in [0.5, 1.5), 1.5 is not; y 5.5, 6.5
    # Box 5 is thinner than a pixel and misses every centre; box 4 is padding.
    np.testing.assert_array_equal(np.asarray(fg, int), expected)
    ign_expected = np.zeros((8, 9), int)
    ign_expected[4:6, 4:8] = 1
    np.testing.assert_array_equal(np.asarray(ign, int), ign_expected)
    np.testing.assert_array_equal(fg, np_mask(BOXES, VALID & ~IGNORE, 8, 9))


def test_mask_random_boxes_and_vmap():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-5, 30, (2, 20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 10, (2, 20, 2))], -1).astype(np.float32)
    valid = rng.uniform(size=(2, 20)) > 0.2
    ignore = rng.uniform(size=(2, 20)) > 0.8
    fg, ign = jax.jit(jax.vmap(lambda b, v, i: foreground_mask(b, v, i, 24, 32)))(
        boxes, valid, ignore
    )
    for b in range(2):
        np.testing.assert_array_equal(fg[b], np_mask(boxes[b], valid[b] & ~ignore[b], 24, 32))
        np.testing.assert_array_equal(ign[b], np_mask(boxes[b], valid[b] & ignore[b], 24, 32))


def np_dfr(recon, target, fg, ign, mode):
    losses = []
    for r, x, m, g in zip(recon, target, fg, ign):
        m, keep = m[..., None], 1 - g[..., None]
        err = {
            "decoupled": m * abs(r - x) + (1 - m) * abs(r),
            "full": abs(r - x),
            "foreground": m * abs(r - x),
            "background": (1 - m) * abs(r),
            "zero": abs(r),
        }[mode]
        losses.append((err * keep).sum() / (keep.sum() * 3))
    return np.mean(losses)


def batch():
    rng = np.random.default_rng(1)
    recon = rng.normal(size=(2, 8, 9, 3)).astype(np.float32)
    target = rng.normal(size=(2, 8, 9, 3)).astype(np.float32)
    fg = np.stack([np_mask(BOXES, VALID & ~IGNORE, 8, 9), np.zeros((8, 9), np.float32)])
    fg[1, :3, :3] = 1
    ign = np.stack([np_mask(BOXES, VALID & IGNORE, 8, 9), np.zeros((8, 9), np.float32)])
    ign[1, 5:, :] = 1
    return recon, target, fg, ign


@pytest.mark.parametrize("mode", ["decoupled", "full", "foreground", "background", "zero"])
def test_loss_modes_match_numpy(mode):
    recon, target, fg, ign = batch()
    np.testing.assert_allclose(
        dfr_loss(recon, target, fg, ign, mode), np_dfr(recon, target, fg, ign, mode), rtol=1e-5
    )
    # An unbatched image equals a batch of one; no ignore mask equals an all-zero one.
    np.testing.assert_allclose(
        dfr_loss(recon[1], target[1], fg[1], ign[1], mode),
        np_dfr(recon[1:], target[1:], fg[1:], ign[1:], mode),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        dfr_loss(recon, target, fg, mode=mode), np_dfr(recon, target, fg, 0 * ign, mode), rtol=1e-5
    )


def test_decoupled_equals_eq9():
    recon, target, fg, _ = batch()
    eq9 = np.abs(recon - fg[..., None] * target).mean()
    np.testing.assert_allclose(dfr_loss(recon, target, fg), eq9, rtol=1e-5)


def test_gradient():
    recon, target, fg, ign = batch()
    grad = jax.grad(lambda r: dfr_loss(r, target, fg, ign))(recon)
    m, keep = fg[..., None], 1 - ign[..., None]
    denom = keep.sum(axis=(1, 2, 3), keepdims=True) * 3 * len(recon)
    expected = keep * (m * np.sign(recon - target) + (1 - m) * np.sign(recon)) / denom
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)


def test_rejects_bad_inputs():
    recon, target, fg, ign = batch()
    with pytest.raises(ValueError, match="mode"):
        dfr_loss(recon, target, fg, ign, mode="l2")
    with pytest.raises(ValueError, match="mask"):
        dfr_loss(recon, target, fg[:, :4], ign)
