"""Sigmoid focal loss (Lin et al. 2017) for dense one-stage classification."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_focal_loss_elementwise(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> jnp.ndarray:
    """Per-class focal loss.

    Args:
      logits: float [..., C] raw class scores.
      labels: int [...]; a class in [0, C) is the positive class, any other value
        (C = background in `ops.ground_truth`, or -1) means every class is negative.
      alpha: weight of positives (1 - alpha for negatives).
      gamma: focusing exponent.
    Returns:
      float [..., C]: -alpha_t (1 - p_t)^gamma log(p_t), computed with log_sigmoid so that
      large |logits| stay finite.
    """
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)  # out of range -> 0
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    ce = -(targets * log_p + (1.0 - targets) * log_not_p)
    p = jnp.exp(log_p)
    one_minus_p_t = targets * (1.0 - p) + (1.0 - targets) * p
    alpha_t = targets * alpha + (1.0 - targets) * (1.0 - alpha)
    return alpha_t * one_minus_p_t**gamma * ce


def sigmoid_focal_loss(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> jnp.ndarray:
    """Sum over points and classes of the focal loss, each point scaled by weights [...].

    Use weights = 0 for padding and ignored points. Normalisation (FCOS: by the number of
    positives) is left to the caller. Shapes as in `sigmoid_focal_loss_elementwise`; returns
    a scalar.
    """
    loss = sigmoid_focal_loss_elementwise(logits, labels, alpha, gamma).sum(-1)
    if weights is not None:
        loss = loss * weights
    return loss.sum()
