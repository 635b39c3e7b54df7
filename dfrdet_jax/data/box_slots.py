"""Bucketed box slots: a training batch's box arrays cut to the fewest slots, out of a few sizes,
that hold all of its boxes.

Target assignment and matching cost grows with the box slots N (``ops.fcos_assign``,
``ops.matcher``: [points or anchors x N] overlaps), and most images have far fewer boxes than
``max_boxes``. Cutting each batch to the smallest bucket that holds it makes that cost follow the
real boxes, while ``jax.jit`` compiles one train step per bucket: a handful of shapes, not one
per count.

The box arrays of the standard batch ('boxes' [B, N, 4], 'labels', 'box_valid', 'ignore' [B, N])
hold each image's rows first (``transforms.pad_example``); a cut keeps every slot up to the last
valid one of any image, so it drops padding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOX_KEYS = ("boxes", "labels", "box_valid", "ignore")


def slot_buckets(max_boxes: int, min_slots: int) -> tuple[int, ...]:
    """The slot counts a training batch may take: min_slots * 2^k below max_boxes, then
    max_boxes itself, e.g. (16, 32, 64, 128, 256, 512, 1024, 1500) for (1500, 16); just
    (max_boxes,) when min_slots >= max_boxes (fixed slots)."""
    if min_slots < 1 or max_boxes < 1:
        raise ValueError(
            f"box slots need max_boxes >= 1 and min_box_slots >= 1, got {max_boxes} and {min_slots}"
        )
    sizes = []
    while min_slots < max_boxes:
        sizes.append(min_slots)
        min_slots *= 2
    return (*sizes, max_boxes)


def trim_box_slots(batch: dict, buckets: Sequence[int]) -> dict:
    """``batch`` (numpy, the standard format) with its box arrays cut to N' slots: the smallest
    of ``buckets`` (ascending, the last >= N) that holds every image's last valid slot; the
    other entries as they are. The arrays are views (no copy)."""
    valid = batch["box_valid"]
    used = int(np.max(np.where(valid, np.arange(1, valid.shape[1] + 1), 0), initial=0))
    slots = next((s for s in buckets if s >= used), valid.shape[1])
    if slots >= valid.shape[1]:
        return batch
    return {k: v[:, :slots] if k in BOX_KEYS else v for k, v in batch.items()}
