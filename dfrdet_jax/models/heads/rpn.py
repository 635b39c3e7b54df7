"""Region proposal network (Ren et al. 2015) over an FPN: objectness and box deltas per anchor,
its training targets and loss, and proposals (top-k and NMS per level, as mmdetection) with static
shapes.

The RPN conv is a tower unit (binary in 1-bit variants); the two prediction convs stay real.
Outputs are flattened in the order of ``anchors.anchor_grid``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfrdet_jax.losses import smooth_l1
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import single_stage
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import matcher, nms, sampling

Array = jax.Array


class RPNHead(nn.Module):
    """Attributes:
    num_anchors: K anchors per cell.
    width: channels of the shared 3x3 conv.
    binary: binarization of that conv.
    dtype: computation dtype.
    level_norms: that conv's norms of their own per level ('norm_level{i}', the i-th level
      given; ``ConvUnit``), the conv shared.
    """

    num_anchors: int
    width: int
    binary: BinarySpec = REAL
    dtype: Any = None
    level_norms: bool = False

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> dict[str, Array]:
        """levels: [B, h_l, w_l, C] -> {'rpn_logits': [B, A], 'rpn_deltas': [B, A, 4]}, float32,
        A = K * sum_l h_l * w_l."""
        (conv,) = single_stage.conv_tower("rpn_conv", 1, self.width, self.binary, self.dtype)
        logit_out = single_stage.prediction_conv(self.num_anchors, "rpn_logits", self.dtype)
        delta_out = single_stage.prediction_conv(4 * self.num_anchors, "rpn_deltas", self.dtype)
        logits, deltas = [], []
        for i, x in enumerate(levels):
            y = conv(x, train, i if self.level_norms else None)
            logits.append(logit_out(y).reshape(x.shape[0], -1))
            deltas.append(delta_out(y).reshape(x.shape[0], -1, 4))
        return {
            "rpn_logits": jnp.concatenate(logits, axis=1).astype(jnp.float32),
            "rpn_deltas": jnp.concatenate(deltas, axis=1).astype(jnp.float32),
        }


def rpn_match(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    gt_ignore: Array,
    *,
    positive_iou: float,
    negative_iou: float,
    ignore_iof: float,
    chunk_size: int | None,
) -> dict[str, Array]:
    """One image's anchors matched as ``matcher.max_iou_targets`` (one class, with low-quality
    matches; ``ignore_iof`` for ignore regions); ``host_targets.AnchorMatcher`` gives the same
    in the input pipeline. Returns {'positive' bool [A], 'ignore' bool [A], 'boxes' float32
    [A, 4] (the matched box; the anchor itself where not positive)}."""
    match = matcher.max_iou_targets(
        anchors,
        gt_boxes,
        jnp.zeros(gt_boxes.shape[:1], jnp.int32),  # one class: "object"
        gt_valid,
        gt_ignore,
        1,
        positive_iou=positive_iou,
        negative_iou=negative_iou,
        low_quality_matches=True,
        ignore_iof=ignore_iof,
        chunk_size=chunk_size,
    )
    return {"positive": match["positive"], "ignore": match["ignore"], "boxes": match["box_targets"]}


def rpn_targets(
    key: Array,
    anchors: Array,
    match: dict[str, Array],
    *,
    num_samples: int,
    positive_fraction: float,
    box_weights: Sequence[float],
) -> dict[str, Array]:
    """Objectness and delta targets of one image's anchors, on a random balanced sample.

    ``match`` is the anchors' assignment ('positive', 'ignore' bool [A], 'boxes' [A, 4], as
    ``rpn_match`` returns); ``num_samples`` anchors are drawn, at most ``positive_fraction``
    positive (``ops.sampling.balanced_sample``), their boxes encoded with ``box_weights``.
    Returns {'objectness' float32 [A] (1 positive, 0 negative), 'weight' float32 [A] (1 for the
    drawn anchors), 'positive' bool [A] (drawn positives), 'deltas' float32 [A, 4] (encoded
    matched box; 0 where not positive)}.
    """
    negative = ~match["positive"] & ~match["ignore"]
    index, valid, is_positive = sampling.balanced_sample(
        key, match["positive"], negative, min(num_samples, anchors.shape[0]), positive_fraction
    )
    size = anchors.shape[0]
    weight = jnp.zeros((size,), jnp.float32).at[index].max(valid.astype(jnp.float32))
    drawn_positive = jnp.zeros((size,), bool).at[index].max(is_positive)
    # Not-positive anchors encode themselves, so that the deltas stay finite.
    boxes = jnp.where(match["positive"][:, None], match["boxes"], anchors)
    deltas = boxes_ops.delta_encode(anchors, boxes, box_weights)
    return {
        "objectness": drawn_positive.astype(jnp.float32),
        "weight": weight,
        "positive": drawn_positive,
        "deltas": jnp.where(drawn_positive[:, None], deltas, 0.0),
    }


def rpn_loss(outputs: dict[str, Array], targets: dict[str, Array], smooth_l1_beta: float):
    """Binary cross-entropy on the drawn anchors and smooth L1 (beta 0: L1, as mmdetection) on
    the drawn positives' deltas, both divided by the number of drawn anchors of the (global)
    batch; targets as ``rpn_targets`` with a leading batch axis.

    Returns {'loss_rpn_cls', 'loss_rpn_box'} scalars.
    """
    logits = outputs["rpn_logits"]
    weight = targets["weight"]
    normaliser = jnp.maximum(weight.sum(), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, targets["objectness"])
    box = smooth_l1.smooth_l1_loss(
        outputs["rpn_deltas"],
        targets["deltas"],
        targets["positive"].astype(jnp.float32),
        smooth_l1_beta,
    )
    return {"loss_rpn_cls": (bce * weight).sum() / normaliser, "loss_rpn_box": box / normaliser}


def rpn_proposals(
    logits: Array,
    deltas: Array,
    anchors: Array,
    level_sizes: Sequence[int],
    image_hw: Array,
    *,
    pre_nms_top_k_per_level: int,
    post_nms_top_k: int,
    nms_iou: float,
    min_size: float,
    box_weights: Sequence[float],
) -> tuple[Array, Array, Array]:
    """Proposals of one image, as mmdetection's RPN: of each level, the
    ``pre_nms_top_k_per_level`` anchors of highest objectness (all of a level that has fewer),
    decoded and clipped to the valid region ``image_hw`` (h, w), those with both sides >
    ``min_size`` px, NMS at ``nms_iou`` within each level (a level's proposals never suppress
    another's); of every level's kept proposals, the ``post_nms_top_k`` of highest objectness.

    This is mmdetection's ``RPNHead._get_bboxes_single`` (2.x; ``_predict_by_feat_single`` and
    ``_bbox_post_process`` in 3.x), mmdet/models/dense_heads/rpn_head.py: per level
    ``scores.sort(descending=True)[:nms_pre]``, then ``batched_nms(proposals, scores, level_ids,
    cfg.nms)`` (mmcv's batched NMS: boxes of different ids never suppress each other) and
    ``dets[:max_per_img]``. One top-k over all levels makes the levels compete for the
    candidates, and one of them (P2, with most anchors and the tiny objects, or a coarser level
    scoring higher) can take them all; per level, every level keeps candidates of its own. The
    levels' NMS runs as one vmapped NMS over [L, k] candidates, k = min(pre_nms_top_k_per_level,
    the largest level), a smaller level padded with candidates that are never kept.

    Args: logits float [A], deltas float [A, 4], anchors float [A, 4] xyxy px, level_sizes: the
    anchors of each level (static, in the order of A; summing to A), image_hw int [2].
    Returns (boxes float32 [post_nms_top_k, 4], objectness float32 [post_nms_top_k] (sigmoid),
    valid bool [post_nms_top_k]), best first; no gradient flows through them.
    """
    if sum(level_sizes) != logits.shape[0]:
        raise ValueError(
            f"rpn_proposals: level_sizes {tuple(level_sizes)} do not add up to the "
            f"{logits.shape[0]} anchors"
        )
    logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
    k = min(pre_nms_top_k_per_level, max(level_sizes))
    top, index, real = [], [], []
    for start, size in zip(np.cumsum((0, *level_sizes[:-1])), level_sizes):
        level_k = min(k, size)
        level_top, level_index = jax.lax.top_k(logits[start : start + size], level_k)
        top.append(jnp.pad(level_top, (0, k - level_k), constant_values=-jnp.inf))
        index.append(jnp.pad(level_index + start, (0, k - level_k)))
        real.append(np.arange(k) < level_k)
    top, index = jnp.stack(top), jnp.stack(index)  # [L, k]
    boxes = boxes_ops.delta_decode(anchors[index], deltas[index], box_weights)
    boxes = boxes_ops.clip_boxes(
        boxes, image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    )
    big_enough = ((boxes[..., 2] - boxes[..., 0]) > min_size) & (
        (boxes[..., 3] - boxes[..., 1]) > min_size
    )
    # No level contributes more than post_nms_top_k proposals: keep at most that many of each.
    kept = jax.vmap(
        lambda level_boxes, level_scores, level_valid: nms.class_wise_nms(
            level_boxes,
            level_scores,
            jnp.zeros((k,), jnp.int32),
            level_valid,
            iou_threshold=nms_iou,
            score_threshold=-1.0,  # keep every proposal NMS keeps, however unlikely
            max_detections=min(post_nms_top_k, k),
            pre_nms_top_k=k,
        )
    )(boxes, jax.nn.sigmoid(top), big_enough & jnp.asarray(np.stack(real)))
    # All levels' kept proposals, best first; padded when they are fewer than post_nms_top_k.
    valid = kept.valid.reshape(-1)
    scores = kept.scores.reshape(-1)
    num = min(post_nms_top_k, valid.shape[0])
    _, order = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), num)
    pad = post_nms_top_k - num
    return (
        jnp.pad(kept.boxes.reshape(-1, 4)[order], ((0, pad), (0, 0))),
        jnp.pad(scores[order], (0, pad)),
        jnp.pad(valid[order], (0, pad)),
    )
