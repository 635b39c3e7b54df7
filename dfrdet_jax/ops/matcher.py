"""Max-IoU matching of anchors (or any candidate boxes) to the ground truth, as detectron2's
Matcher and mmdetection's MaxIoUAssigner: RetinaNet's anchors, the RPN's anchors and the RoIs of
Faster R-CNN's box head; and the check of its two IoU thresholds, shared with config validation.

Ground truth and labels follow ``ops.ground_truth``.
"""

from __future__ import annotations

import jax.numpy as jnp

from dfrdet_jax.ops.boxes import box_area, pairwise_intersection, pairwise_iou
from dfrdet_jax.ops.chunking import chunked_map, map_in_chunks, unchunk
from dfrdet_jax.ops.ground_truth import first_index_of, split_ground_truth
from dfrdet_jax.ops.points import INF

# IoUs this close to a box's best count as its best (low-quality matches): chunked matching
# recomputes the overlaps in a second pass, whose rounding may differ.
TIE_TOLERANCE = 1e-6


def check_iou_thresholds(
    negative_iou: float,
    positive_iou: float,
    where: str,
    names: tuple[str, str] = ("negative_iou", "positive_iou"),
) -> None:
    """ValueError (naming ``where`` and the two settings ``names``) unless
    0 <= negative_iou <= positive_iou <= 1, as ``max_iou_targets`` needs."""
    if not 0.0 <= negative_iou <= positive_iou <= 1.0:
        raise ValueError(
            f"{where} needs 0 <= {names[0]} <= {names[1]} <= 1, got {negative_iou} and "
            f"{positive_iou}"
        )


def max_iou_targets(
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_ignore: jnp.ndarray,
    num_classes: int,
    *,
    positive_iou: float,
    negative_iou: float,
    low_quality_matches: bool,
    ignore_iof: float,
    chunk_size: int | None,
) -> dict[str, jnp.ndarray]:
    """Max-IoU anchor assignment of one image (RetinaNet; as detectron2's Matcher and
    mmdetection's MaxIoUAssigner); vmap over the gt arguments for a batch.

    Every anchor is matched to the assignable box (gt_valid & ~gt_ignore) it overlaps most
    (IoU, ties to the lower box index) and is
      positive    when that IoU >= positive_iou, or, with ``low_quality_matches``, when it is a
                  best anchor (highest IoU > 0, ties within 1e-6 included) of some box: so every
                  box, even one too small for any anchor to reach positive_iou (common for 2-8 px
                  objects), gets at least one positive anchor. Such an anchor keeps its own
                  best-IoU box as target (detectron2's rule);
      background  when that IoU < negative_iou and the anchor is not positive and not covered by
                  an ignore region;
      ignore      otherwise: IoU in [negative_iou, positive_iou), or covered by an ignore region
                  (gt_valid & gt_ignore) with intersection / anchor area >= ``ignore_iof``.

    Memory and work: one pass over the [A, N] overlaps when the anchors fit in one chunk
    (``chunk_size`` None or >= A); else ``chunk_size`` anchors at a time (~chunk_size * N * 4
    floats), twice with ``low_quality_matches`` (a box's best IoU is known only after every
    anchor has been seen).

    Args:
      anchors: float32 [A, 4] xyxy px (``anchors.anchor_grid``).
      gt_boxes: float32 [N, 4] xyxy px; gt_labels int [N] in [0, num_classes);
      gt_valid: bool [N], False rows are padding; gt_ignore: bool [N], ignore regions.
      num_classes: C; the background label.
    Returns dict of:
      labels       int32 [A]     class of the matched box when positive, else ``num_classes``
      box_targets  float32 [A, 4] matched box when positive, else the anchor itself (so that
                                 delta targets stay finite)
      positive     bool [A]
      ignore       bool [A]      neither positive nor background: leave out of the class loss
      gt_index     int32 [A]     matched box when positive, else -1
      max_iou      float32 [A]   IoU with the matched box (-1 when there is none)
    """
    check_iou_thresholds(negative_iou, positive_iou, "max_iou_targets")
    gt_boxes, gt_labels, positive_ok, ignore_ok = split_ground_truth(
        "max_iou_targets", gt_boxes, gt_labels, gt_valid, gt_ignore
    )
    anchors = anchors.astype(jnp.float32)

    def overlaps(chunk):  # [c, N], -1 for boxes that cannot be matched
        return jnp.where(positive_ok[None, :], pairwise_iou(chunk, gt_boxes), -1.0)

    def best_match(chunk, iou):
        iof = pairwise_intersection(chunk, gt_boxes) / jnp.maximum(box_area(chunk), 1e-6)[:, None]
        max_iou = iou.max(axis=1)
        return {
            "max_iou": max_iou,
            "gt_index": first_index_of(iou, max_iou),
            "in_ignore": ((iof >= ignore_iof) & ignore_ok[None, :]).any(axis=1),
            "box_best": iou.max(axis=0),  # per box: its best IoU within this chunk
        }

    def is_best_anchor(iou, box_best):  # [c]: a best anchor (within the tolerance) of some box
        threshold = jnp.where(positive_ok & (box_best > 0), box_best - TIE_TOLERANCE, jnp.inf)
        # any(iou >= threshold) as a plain float max: XLA's CPU code reduces it far faster.
        return (iou - threshold[None, :]).max(axis=1) >= 0

    if chunk_size is None or anchors.shape[0] <= chunk_size:
        iou = overlaps(anchors)
        match = best_match(anchors, iou)
        box_best = match.pop("box_best")
        best = is_best_anchor(iou, box_best) if low_quality_matches else False
    else:
        # Padded anchors are empty boxes far outside the image: IoU 0 with everything.
        pad = (-INF,)
        out = chunked_map(lambda c: best_match(c, overlaps(c)), (anchors,), pad, chunk_size)
        box_best = out.pop("box_best").max(axis=0)  # [N], over all anchors
        match = unchunk(out, anchors.shape[0])
        best = False
        if low_quality_matches:
            best = map_in_chunks(
                lambda c: {"best": is_best_anchor(overlaps(c), box_best)},
                (anchors,),
                pad,
                chunk_size,
            )["best"]
    positive = (match["max_iou"] >= positive_iou) | best
    background = ~positive & (match["max_iou"] < negative_iou) & ~match["in_ignore"]
    gt_index = match["gt_index"]
    return {
        "labels": jnp.where(positive, gt_labels[gt_index], num_classes).astype(jnp.int32),
        "box_targets": jnp.where(positive[:, None], gt_boxes[gt_index], anchors),
        "positive": positive,
        "ignore": ~positive & ~background,
        "gt_index": jnp.where(positive, gt_index, -1).astype(jnp.int32),
        "max_iou": match["max_iou"],
    }
