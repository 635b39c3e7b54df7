"""Random positive/negative sampling with a static output size (Faster R-CNN's RPN and RoI head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def balanced_sample(
    key: jax.Array,
    positive: jnp.ndarray,
    negative: jnp.ndarray,
    num: int,
    positive_fraction: float,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Draws up to ``num`` entries: up to ``floor(num * positive_fraction)`` positives uniformly
    at random, the rest negatives uniformly at random (mmdetection's RandomSampler, detectron2's
    subsample_labels), without replacement.

    Args:
      key: PRNG key.
      positive, negative: bool [P] candidate masks (an entry in neither is never drawn).
      num: slots in the output (static), at most P.
      positive_fraction: the positives' share of ``num`` at most.
    Returns:
      (indices int32 [num], valid bool [num], is_positive bool [num]): drawn positives first,
      then drawn negatives, then padding slots (valid False) when there are too few candidates.
    """
    size = positive.shape[0]
    if num > size:
        raise ValueError(f"balanced_sample: cannot draw {num} of {size} candidates")
    max_positive = int(num * positive_fraction)
    priority = jax.random.uniform(key, (size,))  # in [0, 1)
    drawn_positive = jnp.zeros((size,), bool)
    if max_positive > 0:
        values, index = jax.lax.top_k(jnp.where(positive, priority, -1.0), max_positive)
        drawn_positive = drawn_positive.at[index].set(values >= 0)
    # Drawn positives rank above every negative; negatives by their random priority.
    rank = jnp.where(drawn_positive, 2.0 + priority, jnp.where(negative, priority, -1.0))
    values, index = jax.lax.top_k(rank, num)
    valid = values >= 0
    return index.astype(jnp.int32), valid, valid & drawn_positive[index]
