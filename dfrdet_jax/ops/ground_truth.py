"""Padded ground truth as the target assigners read it (``fcos_assign``, ``matcher``).

One image's ground truth is N fixed slots: boxes float [N, 4] xyxy px, labels int [N] in
[0, num_classes), valid bool [N] (False: a padding slot, ignored entirely) and ignore bool [N]
(True: an ignore region, never a positive). Assigned labels are in [0, num_classes) for positives
and ``num_classes`` for background (and for ignored locations); ``losses.focal`` reads any label
outside [0, num_classes) as background. ``first_index_of`` picks the box a location is assigned
among equals: the lowest index.
"""

from __future__ import annotations

import jax.numpy as jnp


def split_ground_truth(caller: str, gt_boxes, gt_labels, gt_valid, gt_ignore):
    """Checked ground truth of one image: (boxes float32 [N', 4], labels [N'], positive_ok [N'],
    ignore_ok [N']) with N' = max(N, 1): an image without rows gets one invalid padding row,
    because argmin/argmax need at least one column. positive_ok = valid & ~ignore (boxes that
    can be assigned), ignore_ok = valid & ignore (ignore regions). ValueError naming ``caller``
    when the shapes disagree."""
    num_gt = gt_boxes.shape[0]
    for name, arr in (("gt_labels", gt_labels), ("gt_valid", gt_valid), ("gt_ignore", gt_ignore)):
        if arr.shape != (num_gt,):
            raise ValueError(
                f"{caller}: {name} {arr.shape} does not match gt_boxes {gt_boxes.shape}"
            )
    if num_gt == 0:
        gt_boxes, gt_labels = jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32)
        gt_valid, gt_ignore = jnp.zeros((1,), bool), jnp.zeros((1,), bool)
    return gt_boxes.astype(jnp.float32), gt_labels, gt_valid & ~gt_ignore, gt_valid & gt_ignore


def first_index_of(x, value):
    """int32 [c]: the first column of each row of x [c, N] equal to value [c] (its row's max or
    min, so one exists), as jnp.argmax / argmin choose among ties. One min over the matching
    columns: jnp.argmax's (value, index) reduction is several times slower on XLA's CPU."""
    columns = jnp.arange(x.shape[1], dtype=jnp.int32)
    return jnp.where(x == value[:, None], columns[None, :], x.shape[1]).min(axis=1)
