"""Faster R-CNN's second stage: RoI sampling, the two-FC box head, its loss and post-processing.

The box head flattens each RoIAlign-ed [S, S, C] region and runs two fully connected layers of
``fc_width`` (binary in 1-bit variants: ``ConvUnit``s on 1 x 1 maps, a Bi-Real identity
shortcut around the second), then two real prediction layers: C + 1 class logits (index C =
background) and class-specific deltas [C, 4] (coder weights ``faster_rcnn.ROI_BOX_WEIGHTS``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dfrdet_jax.losses import smooth_l1
from dfrdet_jax.models.common import REAL, BinarySpec, ConvUnit
from dfrdet_jax.models.heads import single_stage
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import matcher, nms, sampling

Array = jax.Array


class RoIBoxHead(nn.Module):
    """Attributes:
    num_classes: foreground classes C.
    fc_width: width of the two hidden layers.
    binary: binarization of the hidden layers.
    dtype: computation dtype.
    """

    num_classes: int
    fc_width: int
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(self, regions: Array, train: bool) -> dict[str, Array]:
        """regions [..., S, S, C] -> {'roi_cls_logits': [..., C + 1], 'roi_deltas':
        [..., C, 4]} float32."""
        lead = regions.shape[:-3]
        x = regions.reshape(-1, 1, 1, regions.shape[-3] * regions.shape[-2] * regions.shape[-1])
        norm = "group" if self.binary.enabled else "none"
        for i in range(2):
            # No Bi-Real shortcut into the first layer: its real projection from the S * S * C
            # inputs would be as large as the layer itself.
            x = ConvUnit(
                self.fc_width,
                1,
                binary=self.binary,
                norm=norm,
                shortcut=i > 0,
                dtype=self.dtype,
                name=f"fc{i}",
            )(x, train, defer_activation=i == 0)
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(
            self.num_classes + 1,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            name="cls_logits",
        )(x)
        deltas = nn.Dense(
            4 * self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.001),
            name="bbox_pred",
        )(x)
        return {
            "roi_cls_logits": logits.reshape(*lead, self.num_classes + 1).astype(jnp.float32),
            "roi_deltas": deltas.reshape(*lead, self.num_classes, 4).astype(jnp.float32),
        }


def sample_rois(
    key: Array,
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    gt_ignore: Array,
    num_classes: int,
    *,
    num_samples: int,
    positive_fraction: float,
    positive_iou: float,
    negative_iou: float,
    ignore_iof: float,
    box_weights: Sequence[float],
) -> dict[str, Array]:
    """The RoIs one image trains its box head on.

    Candidates are the valid proposals plus the ground-truth boxes themselves (so that positives
    exist from the first step). Each is matched to its best box (``matcher.max_iou_targets``, no
    low-quality matches; ``ignore_iof`` for ignore regions): positive at IoU >= positive_iou,
    background below negative_iou; then ``num_samples`` are drawn, at most ``positive_fraction``
    positive, and the positives' boxes encoded with the coder weights ``box_weights``.

    Args:
      proposals: float [P, 4] xyxy px; proposal_valid: bool [P].
      gt_*: the image's rows of the standard batch (boxes [N, 4], labels, valid, ignore [N]).
    Returns {'rois' [num_samples, 4], 'labels' int32 [num_samples] (C = background),
    'deltas' float32 [num_samples, 4] (targets of positives, 0 elsewhere), 'weight' float32
    [num_samples] (1 for drawn RoIs), 'positive' bool [num_samples]}.
    """
    assignable = gt_valid & ~gt_ignore
    candidates = jnp.concatenate([jax.lax.stop_gradient(proposals), gt_boxes.astype(jnp.float32)])
    candidate_valid = jnp.concatenate([proposal_valid, assignable])
    match = matcher.max_iou_targets(
        candidates,
        gt_boxes,
        gt_labels,
        gt_valid,
        gt_ignore,
        num_classes,
        positive_iou=positive_iou,
        negative_iou=negative_iou,
        low_quality_matches=False,
        ignore_iof=ignore_iof,
        chunk_size=None,
    )
    positive = match["positive"] & candidate_valid
    negative = ~match["positive"] & ~match["ignore"] & candidate_valid
    index, valid, is_positive = sampling.balanced_sample(
        key, positive, negative, num_samples, positive_fraction
    )
    rois = candidates[index]
    deltas = boxes_ops.delta_encode(rois, match["box_targets"][index], box_weights)
    return {
        "rois": rois,
        "labels": jnp.where(is_positive, match["labels"][index], num_classes).astype(jnp.int32),
        "deltas": jnp.where(is_positive[:, None], deltas, 0.0),
        "weight": valid.astype(jnp.float32),
        "positive": is_positive,
    }


def roi_loss(outputs: dict[str, Array], targets: dict[str, Array], smooth_l1_beta: float):
    """Softmax cross-entropy over C + 1 classes on the drawn RoIs and smooth L1 (beta 0: L1) on
    the drawn positives' deltas of their own class, both divided by the number of drawn RoIs of
    the (global) batch; targets as ``sample_rois`` with a leading batch axis.

    Returns {'loss_roi_cls', 'loss_roi_box'} scalars.
    """
    weight = targets["weight"]
    normaliser = jnp.maximum(weight.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        outputs["roi_cls_logits"], targets["labels"]
    )
    num_classes = outputs["roi_deltas"].shape[-2]
    own_class = jnp.minimum(targets["labels"], num_classes - 1)  # background rows get weight 0
    predicted = jnp.take_along_axis(outputs["roi_deltas"], own_class[..., None, None], axis=-2)[
        ..., 0, :
    ]
    box = smooth_l1.smooth_l1_loss(
        predicted, targets["deltas"], targets["positive"].astype(jnp.float32), smooth_l1_beta
    )
    return {"loss_roi_cls": (ce * weight).sum() / normaliser, "loss_roi_box": box / normaliser}


def roi_postprocess(
    outputs: dict[str, Array],
    image_hw: Array,
    *,
    box_weights: Sequence[float],
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
) -> nms.Detections:
    """Detections of a batch from the box head run on the proposals: class c of proposal p scores
    softmax(logits)[c], its box is the proposal moved by its class-c deltas (coder weights
    ``box_weights``), clipped to the valid region; the best pre_nms_top_k pairs above
    score_threshold go through class-wise NMS.

    outputs: 'roi_cls_logits' [B, P, C + 1], 'roi_deltas' [B, P, C, 4], 'proposals' [B, P, 4],
    'proposal_valid' [B, P]. Returns ``Detections`` with a leading batch axis.
    """
    num_classes = outputs["roi_deltas"].shape[-2]
    scores = jax.nn.softmax(outputs["roi_cls_logits"])[..., :num_classes]
    scores = jnp.where(outputs["proposal_valid"][..., None], scores, 0.0)
    boxes = boxes_ops.delta_decode(
        outputs["proposals"][:, :, None, :], outputs["roi_deltas"], box_weights
    )  # [B, P, C, 4]

    def decode(location, classes, rows):
        del location
        return jnp.take_along_axis(rows.reshape(-1, num_classes, 4), classes[:, None, None], 1)[
            :, 0
        ]

    return single_stage.dense_postprocess(
        scores,
        boxes.reshape(*boxes.shape[:2], num_classes * 4),
        decode,
        image_hw,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
    )
