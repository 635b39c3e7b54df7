"""RetinaNet head (Lin et al. 2017): per-anchor class logits and box deltas, shared over levels.

For every feature-map cell and each of its K anchors (``dfrdet_jax.ops.anchors``):
  class logits [C]   from the classification tower (bias initialised to the 0.01 prior);
  deltas [4]         (dx, dy, dw, dh) of the box relative to the anchor (``ops.boxes``'s coder,
                     with the configured weights), from the regression tower.
Towers and prediction convs as ``heads.dense`` (binary towers in 1-bit variants, real prediction
convs). Outputs are flattened level by level, row-major within a level, anchors of a cell last:
the order of ``anchors.anchor_grid``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax.losses import focal, iou, smooth_l1
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import dense
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import assign, nms
from dfrdet_jax.ops import boxes as boxes_ops

Array = jax.Array
BOX_LOSSES = ("smooth_l1", "giou")


def check_box_loss(box_loss: str, what: str) -> None:
    """ValueError naming ``what`` for a box loss not in ``BOX_LOSSES``."""
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"Unknown {what} {box_loss!r}; valid choices: {list(BOX_LOSSES)}")


class RetinaNetHead(nn.Module):
    """Attributes:
    num_classes: number of foreground classes.
    num_anchors: K, anchors per feature-map cell.
    width: tower channels.
    num_convs: convs per tower.
    prior_prob: initial foreground probability of the classifier.
    binary: binarization of the tower convs.
    dtype: computation dtype.
    """

    num_classes: int
    num_anchors: int
    width: int = 256
    num_convs: int = 4
    prior_prob: float = 0.01
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> dict[str, Array]:
        """levels: [B, h_l, w_l, C] maps -> {'cls_logits': [B, A, num_classes], 'deltas':
        [B, A, 4]} with A = K * sum_l h_l * w_l (float32)."""
        cls_tower = dense.conv_tower(
            "cls_tower", self.num_convs, self.width, self.binary, self.dtype
        )
        reg_tower = dense.conv_tower(
            "reg_tower", self.num_convs, self.width, self.binary, self.dtype
        )
        cls_out = dense.prediction_conv(
            self.num_anchors * self.num_classes, "cls_logits", self.dtype, self.prior_prob
        )
        reg_out = dense.prediction_conv(self.num_anchors * 4, "bbox_pred", self.dtype)
        outputs = {"cls_logits": [], "deltas": []}
        for x in levels:
            batch = x.shape[0]
            c = cls_out(dense.run_tower(cls_tower, x, train))
            r = reg_out(dense.run_tower(reg_tower, x, train))
            outputs["cls_logits"].append(c.reshape(batch, -1, self.num_classes))
            outputs["deltas"].append(r.reshape(batch, -1, 4))
        return {k: jnp.concatenate(v, axis=1).astype(jnp.float32) for k, v in outputs.items()}


def retinanet_anchors(
    input_hw: tuple[int, int], strides: Sequence[int], anchor_config
) -> np.ndarray:
    """Anchors float32 [A, 4] xyxy px of an input of ``input_hw`` (the head's output order).

    anchor_config: has octave_base_scale, scales_per_octave, aspect_ratios (config.retinanet).
    """
    anchors, _ = anchors_ops.anchor_grid(
        dense.feature_sizes(input_hw, strides),
        strides,
        octave_base_scale=anchor_config.octave_base_scale,
        scales_per_octave=anchor_config.scales_per_octave,
        aspect_ratios=tuple(anchor_config.aspect_ratios),
    )
    return anchors


def retinanet_loss(
    outputs: dict[str, Array],
    batch: dict[str, Array],
    *,
    anchors: np.ndarray,
    num_classes: int,
    positive_iou: float = 0.5,
    negative_iou: float = 0.4,
    low_quality_matches: bool = True,
    ignore_iof: float = 0.5,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    chunk_size: int | None = 16384,
) -> dict[str, Array]:
    """RetinaNet detection loss of a batch: focal loss + box loss, both divided by the number of
    positive anchors in the whole (global) batch.

    Args:
      outputs: head outputs, 'cls_logits' [B, A, C], 'deltas' [B, A, 4].
      batch: the standard batch ('boxes', 'labels', 'box_valid', 'ignore').
      anchors: float32 [A, 4] xyxy px (``retinanet_anchors`` of the batch's image size).
      positive_iou, negative_iou, low_quality_matches, ignore_iof, chunk_size: matching, see
        ``dfrdet_jax.ops.assign.max_iou_targets``.
      focal_alpha, focal_gamma: focal loss settings; anchors that are ignored get no class loss.
      box_loss: 'smooth_l1' on the deltas (beta ``smooth_l1_beta``; 0 = L1, mmdetection's
        RetinaNet) or 'giou' on the decoded boxes.
      box_weights: (wx, wy, ww, wh) of the delta coder.

    Returns:
      {'loss_cls', 'loss_box', 'num_positive'} float32 scalars.
    """
    check_box_loss(box_loss, "RetinaNet box_loss")
    anchors = jnp.asarray(anchors)
    if anchors.shape[0] != outputs["deltas"].shape[1]:
        raise ValueError(
            f"retinanet_loss: {anchors.shape[0]} anchors for {outputs['deltas'].shape[1]} "
            "predictions; anchors must come from the same image size and anchor settings"
        )
    targets = jax.vmap(
        lambda boxes, labels, valid, ignore: assign.max_iou_targets(
            anchors,
            boxes,
            labels,
            valid,
            ignore,
            num_classes,
            positive_iou=positive_iou,
            negative_iou=negative_iou,
            low_quality_matches=low_quality_matches,
            ignore_iof=ignore_iof,
            chunk_size=chunk_size,
        )
    )(batch["boxes"], batch["labels"], batch["box_valid"], batch["ignore"])
    positive = targets["positive"].astype(jnp.float32)
    num_positive = positive.sum()
    normaliser = jnp.maximum(num_positive, 1.0)
    loss_cls = focal.sigmoid_focal_loss(
        outputs["cls_logits"],
        targets["labels"],
        weights=1.0 - targets["ignore"].astype(jnp.float32),
        alpha=focal_alpha,
        gamma=focal_gamma,
    )
    if box_loss == "giou":
        predicted = boxes_ops.delta_decode(anchors, outputs["deltas"], box_weights)
        loss_box = iou.giou_loss(predicted, targets["box_targets"], positive)
    else:
        # Non-positive anchors target themselves (zero deltas), so the coder stays finite.
        deltas = boxes_ops.delta_encode(anchors, targets["box_targets"], box_weights)
        loss_box = smooth_l1.smooth_l1_loss(outputs["deltas"], deltas, positive, smooth_l1_beta)
    return {
        "loss_cls": loss_cls / normaliser,
        "loss_box": loss_box / normaliser,
        "num_positive": num_positive,
    }


def retinanet_postprocess(
    outputs: dict[str, Array],
    image_hw: Array,
    *,
    anchors: np.ndarray,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    pre_nms_top_k: int = 1000,
) -> nms.Detections:
    """Boxes, scores (sigmoid of the class logits) and classes of a batch, static-shape: the
    ``pre_nms_top_k`` best (anchor, class) pairs of each image above ``score_threshold`` are
    decoded, clipped to the valid region (``image_hw`` int [B, 2]) and go through class-wise NMS.

    Returns ``Detections`` with a leading batch axis (see ``heads.dense.dense_postprocess``).
    """
    anchors = jnp.asarray(anchors)
    return dense.dense_postprocess(
        jax.nn.sigmoid(outputs["cls_logits"]),
        outputs["deltas"],
        lambda location, _, deltas: boxes_ops.delta_decode(anchors[location], deltas, box_weights),
        image_hw,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
    )
