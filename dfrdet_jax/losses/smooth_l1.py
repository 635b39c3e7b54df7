"""Smooth L1 (Huber-like) regression loss of R-CNN / RetinaNet box deltas."""

from __future__ import annotations

import jax.numpy as jnp


def smooth_l1_loss(
    pred: jnp.ndarray, target: jnp.ndarray, weights: jnp.ndarray | None = None, beta: float = 0.0
) -> jnp.ndarray:
    """Sum of weights * smooth-L1(pred - target) over paired deltas [..., 4] -> scalar.

    Per coordinate: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; beta = 0 is plain L1
    (mmdetection's RetinaNet), beta = 1/9 detectron2's. weights [...] scale each row of 4
    (1 for positives, 0 elsewhere); normalisation is left to the caller.
    """
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    d = jnp.abs(pred - target)
    loss = jnp.where(d < beta, 0.5 * d * d / max(beta, 1e-12), d - 0.5 * beta).sum(-1)
    return (loss if weights is None else loss * weights).sum()
