"""Static-shape, class-wise greedy non-maximum suppression for jit and vmap."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dfrdet_jax.ops.boxes import pairwise_iou


class Detections(NamedTuple):
    """Fixed-size detections of one image (add a leading [B] under vmap).

    boxes   float32 [D, 4]  xyxy px; 0 where not valid
    scores  float32 [D]     descending among valid entries; 0 where not valid
    classes int32   [D]     class index; -1 where not valid
    valid   bool    [D]     the first `valid.sum()` entries are detections, the rest padding
    """

    boxes: jnp.ndarray
    scores: jnp.ndarray
    classes: jnp.ndarray
    valid: jnp.ndarray


def class_wise_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    classes: jnp.ndarray,
    valid: jnp.ndarray,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.05,
    max_detections: int = 1500,
    pre_nms_top_k: int = 5000,
) -> Detections:
    """Greedy NMS applied independently per class, with static output size.

    Candidates are the entries with `valid` and `score > score_threshold`; the
    `pre_nms_top_k` best of them (by score, ties to the lower index) go through greedy NMS:
    in descending score order a candidate is kept unless a kept box of the same class
    overlaps it with IoU > iou_threshold. The first `max_detections` kept boxes are returned.
    This is the same kept set as the usual per-class (batched) NMS of torchvision/mmdetection.

    Cost: one [k, k] IoU matrix with k = min(pre_nms_top_k, K) (k=5000 -> 100 MB float32)
    and a while_loop of at most k cheap steps that stops early once no candidate is left or
    `max_detections` boxes are kept. Same-class pairs are selected with a class-equality
    mask instead of the coordinate-offset trick, which loses float precision on large images.

    Args:
      boxes: float32 [K, 4] xyxy px.
      scores: float32 [K].
      classes: int [K] class index.
      valid: bool [K]; False entries are never returned.
      iou_threshold: suppress when IoU > this value.
      score_threshold: keep only scores strictly above this value.
      max_detections: D, the static number of output slots.
      pre_nms_top_k: at most this many candidates enter NMS (static).
    Returns:
      `Detections` with [D] leading shapes, kept boxes first in descending score order.
    """
    num = boxes.shape[0]
    if scores.shape != (num,) or classes.shape != (num,) or valid.shape != (num,):
        raise ValueError(
            f"class_wise_nms: boxes {boxes.shape}, scores {scores.shape}, classes "
            f"{classes.shape} and valid {valid.shape} must share the leading size K"
        )
    k = min(pre_nms_top_k, num)
    candidate = valid & (scores > score_threshold)
    # -inf ranks non-candidates last; lax.top_k breaks ties towards the lower index.
    ranked = jnp.where(candidate, scores, -jnp.inf)
    top_scores, order = jax.lax.top_k(ranked, k)
    top_boxes = boxes[order]
    top_classes = classes[order].astype(jnp.int32)
    top_candidate = candidate[order]

    same_class = top_classes[:, None] == top_classes[None, :]
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]
    # suppresses[i, j]: keeping candidate i removes the lower-ranked candidate j.
    suppresses = (pairwise_iou(top_boxes, top_boxes) > iou_threshold) & same_class & later
    num_candidates = top_candidate.sum()

    def not_done(carry):
        i, _, num_kept = carry
        return (i < num_candidates) & (num_kept < max_detections)

    def visit(carry):
        i, alive, num_kept = carry
        keep_i = alive[i]
        alive = alive & ~(suppresses[i] & keep_i)
        return i + 1, alive, num_kept + keep_i.astype(jnp.int32)

    stop, alive, _ = jax.lax.while_loop(
        not_done, visit, (jnp.int32(0), top_candidate, jnp.int32(0))
    )
    # Candidates after the stop index were never visited (max_detections reached).
    keep = alive & (jnp.arange(k) < stop)

    # Scatter kept entries, already in score order, into the first output slots.
    slot = jnp.where(keep, jnp.cumsum(keep) - 1, max_detections)
    out_boxes = jnp.zeros((max_detections, 4), boxes.dtype).at[slot].set(top_boxes, mode="drop")
    out_scores = jnp.zeros((max_detections,), scores.dtype).at[slot].set(top_scores, mode="drop")
    out_classes = jnp.full((max_detections,), -1, jnp.int32).at[slot].set(top_classes, mode="drop")
    out_valid = jnp.zeros((max_detections,), bool).at[slot].set(True, mode="drop")
    return Detections(out_boxes, out_scores, out_classes, out_valid)
