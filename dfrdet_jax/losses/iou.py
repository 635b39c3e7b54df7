"""IoU-family box regression losses and the FCOS centre-ness loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dfrdet_jax.ops.boxes import centerness_target, paired_giou, paired_iou

__all__ = ["giou_loss", "iou_loss", "centerness_target", "centerness_loss"]

_EPS = 1e-6


def _weighted_sum(loss: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
    return (loss if weights is None else loss * weights).sum()


def giou_loss(pred: jnp.ndarray, target: jnp.ndarray, weights: jnp.ndarray | None = None):
    """Sum of weights * (1 - GIoU) for paired boxes pred [..., 4], target [..., 4] (xyxy px).

    weights [...] (e.g. FCOS weights positives by their centre-ness target); returns a scalar,
    normalisation is left to the caller. Finite (and with finite gradients) for degenerate or
    zero boxes, so masked entries may hold anything finite.
    """
    return _weighted_sum(1.0 - paired_giou(pred, target), weights)


def iou_loss(
    pred: jnp.ndarray,
    target: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    mode: str = "linear",
):
    """Sum of weights * IoU loss for paired boxes [..., 4] (xyxy px) -> scalar.

    mode 'linear': 1 - IoU; mode 'log': -log(max(IoU, 1e-6)) (UnitBox, original FCOS).
    """
    iou = paired_iou(pred, target)
    if mode == "linear":
        loss = 1.0 - iou
    elif mode == "log":
        loss = -jnp.log(jnp.maximum(iou, _EPS))
    else:
        raise ValueError(f"iou_loss: mode must be 'linear' or 'log', got {mode!r}")
    return _weighted_sum(loss, weights)


def centerness_loss(
    logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Sum of weights * binary cross-entropy with logits, for centre-ness.

    logits [...] raw predictions, targets [...] in [0, 1] (`centerness_target`),
    weights [...] (1 for positives, 0 elsewhere). Returns a scalar.
    """
    bce = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
    return _weighted_sum(bce, weights)
