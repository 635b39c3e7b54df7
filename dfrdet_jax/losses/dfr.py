"""Discriminative Feature Refinement loss of DFR-Det (ICML 2024, Eq. 7, 9, 10).

The decoder reconstructs the normalised input image from P2..P4; the loss asks it to
reproduce the image inside ground-truth boxes (foreground) and to output zero elsewhere
(background): L_DFR = ||phi(F) - M * X||_1 = ||phi(F_f) - X_f||_1 + ||phi(F_b)||_1.
"""

from __future__ import annotations

import jax.numpy as jnp

from dfrdet_jax.choices import check_choice

MODES = ("decoupled", "full", "foreground", "background", "zero")


def _coverage(boxes: jnp.ndarray, select: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """[H, W] float 0/1: pixels whose centre lies in any selected box."""
    cy = jnp.arange(height, dtype=jnp.float32) + 0.5
    cx = jnp.arange(width, dtype=jnp.float32) + 0.5
    rows = (cy[None, :] >= boxes[:, 1:2]) & (cy[None, :] < boxes[:, 3:4]) & select[:, None]
    cols = (cx[None, :] >= boxes[:, 0:1]) & (cx[None, :] < boxes[:, 2:3])
    # rows^T @ cols counts the boxes covering each pixel: exact for 0/1 inputs, and only
    # O(N (H + W)) memory instead of a dense [N, H, W] box stack.
    count = jnp.matmul(rows.T.astype(jnp.float32), cols.astype(jnp.float32))
    return jnp.minimum(count, 1.0)


def foreground_mask(
    boxes: jnp.ndarray, valid: jnp.ndarray, ignore: jnp.ndarray, height: int, width: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Binary masks M (Eq. 7) of the ground-truth boxes and of the ignore regions.

    Pixel (i, j) (row i, column j) belongs to a box when its centre (j + 0.5, i + 0.5) lies in
    [x1, x2) x [y1, y2). A box narrower than a pixel may therefore cover no pixel.

    Args:
      boxes: float32 [N, 4] xyxy px.
      valid: bool [N]; padding rows are False.
      ignore: bool [N]; ignore regions (valid & ignore) go to the ignore mask only.
      height, width: static image size in px.
    Returns:
      (fg float32 [H, W], ignore_mask float32 [H, W]), values 0/1. vmap for a batch.
    """
    boxes = boxes.astype(jnp.float32)
    fg = _coverage(boxes, valid & ~ignore, height, width)
    ignore_mask = _coverage(boxes, valid & ignore, height, width)
    return fg, ignore_mask


def dfr_loss(
    recon: jnp.ndarray,
    target: jnp.ndarray,
    fg_mask: jnp.ndarray,
    ignore_mask: jnp.ndarray | None = None,
    mode: str = "decoupled",
) -> jnp.ndarray:
    """DFR reconstruction loss, L1, averaged per pixel and channel.

    Per pixel (summed over channels), with M the foreground mask:
      'decoupled'  Eq. 10 (= Eq. 9): M |phi(F) - X| + (1 - M) |phi(F)|
      'full'       |phi(F) - X|          (Table 1 baseline ||phi(F) - X||_1)
      'foreground' M |phi(F) - X|        (||phi(F_f) - X_f||_1 only)
      'background' (1 - M) |phi(F)|      (||phi(F_b)||_1 only)
      'zero'       |phi(F)|              (a control, not in the paper: a blank image asked for
                                          everywhere, so no term carries the image or the boxes)
    Pixels of the ignore mask are left out of every term. Normalisation: the sum of an
    image is divided by (number of non-ignored pixels x channels), the same denominator in
    every mode, then images are averaged over the batch.

    Args:
      recon: float [H, W, C] or [B, H, W, C] decoder output phi(F).
      target: same shape, the input image X normalised as the network input.
      fg_mask: float/bool [H, W] or [B, H, W], 1 on foreground.
      ignore_mask: optional, same shape as fg_mask, 1 on ignored pixels.
      mode: one of MODES.
    Returns:
      scalar float32.
    """
    check_choice("dfr_loss mode", mode, MODES)
    if recon.shape != target.shape:
        raise ValueError(f"dfr_loss: recon {recon.shape} and target {target.shape} differ")
    if recon.ndim == 3:
        recon, target, fg_mask = recon[None], target[None], fg_mask[None]
        ignore_mask = None if ignore_mask is None else ignore_mask[None]
    if fg_mask.shape != recon.shape[:-1]:
        raise ValueError(f"dfr_loss: mask {fg_mask.shape} does not match image {recon.shape}")
    fg = fg_mask.astype(recon.dtype)[..., None]
    if ignore_mask is None:
        keep = jnp.ones_like(fg)
    else:
        keep = 1.0 - ignore_mask.astype(recon.dtype)[..., None]
    fg_error = fg * jnp.abs(recon - target)
    bg_error = (1.0 - fg) * jnp.abs(recon)
    error = {
        "decoupled": fg_error + bg_error,
        "full": jnp.abs(recon - target),
        "foreground": fg_error,
        "background": bg_error,
        "zero": jnp.abs(recon),
    }[mode]
    per_image = (keep * error).sum(axis=(1, 2, 3))
    denominator = jnp.maximum(keep.sum(axis=(1, 2, 3)) * recon.shape[-1], 1.0)
    return (per_image / denominator).mean()
