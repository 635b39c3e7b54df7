"""FCOS head (Tian et al. 2019): shared classification and regression towers over all levels.

Per level l with stride s_l, for every feature-map location:
  class logits [C]      from the classification tower (bias initialised to the 0.01 prior);
  ltrb distances [4]    relu(scale_l * t) * s_l in pixels, scale_l learned per level;
  centerness logit [1]  from the regression tower.
Towers and prediction convs as ``heads.dense`` (binary towers in 1-bit variants, real prediction
convs).

Outputs are flattened level by level, row-major within a level, which is the point order of
``dfrdet_jax.ops.assign.fcos_points``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrdet_jax.losses import focal, iou
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import dense
from dfrdet_jax.ops import assign, nms
from dfrdet_jax.ops import boxes as boxes_ops

Array = jax.Array


class FCOSHead(nn.Module):
    """Attributes:
    num_classes: number of foreground classes.
    strides: stride of each input level, in the order the levels are given.
    width: tower channels.
    num_convs: convs per tower.
    prior_prob: initial foreground probability of the classifier.
    binary: binarization of the tower convs.
    dtype: computation dtype.
    """

    num_classes: int
    strides: Sequence[int]
    width: int = 256
    num_convs: int = 4
    prior_prob: float = 0.01
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> dict[str, Array]:
        """levels: one [B, h_l, w_l, C] map per stride -> {'cls_logits': [B, P, num_classes],
        'ltrb': [B, P, 4] pixels, 'centerness': [B, P]} with P = sum_l h_l * w_l (float32)."""
        if len(levels) != len(self.strides):
            raise ValueError(f"FCOSHead got {len(levels)} levels for {len(self.strides)} strides")
        cls_tower = dense.conv_tower(
            "cls_tower", self.num_convs, self.width, self.binary, self.dtype
        )
        reg_tower = dense.conv_tower(
            "reg_tower", self.num_convs, self.width, self.binary, self.dtype
        )
        cls_out = dense.prediction_conv(self.num_classes, "cls_logits", self.dtype, self.prior_prob)
        reg_out = dense.prediction_conv(4, "bbox_pred", self.dtype)
        ctr_out = dense.prediction_conv(1, "centerness", self.dtype)
        scales = self.param("level_scales", nn.initializers.ones, (len(self.strides),))

        outputs = {"cls_logits": [], "ltrb": [], "centerness": []}
        for index, (x, stride) in enumerate(zip(levels, self.strides, strict=True)):
            c = dense.run_tower(cls_tower, x, train)
            r = dense.run_tower(reg_tower, x, train)
            batch = x.shape[0]
            outputs["cls_logits"].append(cls_out(c).reshape(batch, -1, self.num_classes))
            ltrb = nn.relu(scales[index] * reg_out(r).astype(jnp.float32)) * stride
            outputs["ltrb"].append(ltrb.reshape(batch, -1, 4))
            outputs["centerness"].append(ctr_out(r).reshape(batch, -1))
        return {k: jnp.concatenate(v, axis=1).astype(jnp.float32) for k, v in outputs.items()}


def fcos_loss(
    outputs: dict[str, Array],
    batch: dict[str, Array],
    *,
    strides: Sequence[int],
    regress_ranges,
    num_classes: int,
    center_sampling: bool = True,
    center_radius: float = 1.5,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    chunk_size: int | None = 4096,
) -> dict[str, Array]:
    """FCOS detection loss of a batch: focal + GIoU + centerness, as mmdetection's FCOSHead.

    Normalisation: the focal and centerness sums are divided by the number of positive points in
    the whole (global) batch; the GIoU sum, weighted by each positive's centerness target, by the
    sum of those targets.

    Args:
      outputs: head outputs, 'cls_logits' [B, P, C], 'ltrb' [B, P, 4] px, 'centerness' [B, P].
      batch: the standard batch ('image' [B, H, W, 3], 'boxes', 'labels', 'box_valid', 'ignore').
      strides, regress_ranges ([L, 2] px), num_classes, center_sampling, center_radius, chunk_size:
        target assignment settings, see ``dfrdet_jax.ops.assign.fcos_targets``.
      focal_alpha, focal_gamma: focal loss settings.

    Returns:
      {'loss_cls', 'loss_box', 'loss_centerness', 'num_positive'} float32 scalars.
    """
    points, level = assign.fcos_flat_points(
        dense.feature_sizes(batch["image"].shape[1:3], strides), strides
    )
    targets = jax.vmap(
        lambda boxes, labels, valid, ignore: assign.fcos_targets(
            points,
            level,
            jnp.asarray(regress_ranges),
            strides,
            boxes,
            labels,
            valid,
            ignore,
            num_classes,
            center_sampling=center_sampling,
            center_radius=center_radius,
            chunk_size=chunk_size,
        )
    )(batch["boxes"], batch["labels"], batch["box_valid"], batch["ignore"])
    positive = targets["positive"].astype(jnp.float32)
    num_positive = positive.sum()
    normaliser = jnp.maximum(num_positive, 1.0)
    loss_cls = (
        focal.sigmoid_focal_loss(
            outputs["cls_logits"],
            targets["labels"],
            weights=1.0 - targets["ignore"].astype(jnp.float32),
            alpha=focal_alpha,
            gamma=focal_gamma,
        )
        / normaliser
    )
    predicted_boxes = boxes_ops.ltrb_decode(jnp.asarray(points), outputs["ltrb"])
    box_weight = targets["centerness"] * positive
    loss_box = iou.giou_loss(predicted_boxes, targets["box_targets"], box_weight) / jnp.maximum(
        box_weight.sum(), 1e-6
    )
    loss_centerness = (
        iou.centerness_loss(outputs["centerness"], targets["centerness"], positive) / normaliser
    )
    return {
        "loss_cls": loss_cls,
        "loss_box": loss_box,
        "loss_centerness": loss_centerness,
        "num_positive": num_positive,
    }


def fcos_postprocess(
    outputs: dict[str, Array],
    image_hw: Array,
    *,
    input_hw: tuple[int, int],
    strides: Sequence[int],
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    pre_nms_top_k: int = 1000,
) -> nms.Detections:
    """Boxes, scores and classes of a batch, static-shape and jit-compatible.

    Score of a (point, class) pair: sqrt(sigmoid(class logit) * sigmoid(centerness logit)); the
    ``pre_nms_top_k`` best pairs above ``score_threshold`` of each image go through class-wise NMS.
    Boxes are clipped to the valid (unpadded) region of each image.

    Args:
      outputs: head outputs as in ``fcos_loss``.
      image_hw: int [B, 2] valid (h, w) of each image in px.
      input_hw: static (H, W) of the padded input.
      strides: the head's strides.

    Returns:
      ``Detections`` with a leading batch axis: boxes [B, D, 4] px of the padded input, scores
      [B, D], classes [B, D], valid [B, D], D = max_detections.
    """
    points = jnp.asarray(
        assign.fcos_flat_points(dense.feature_sizes(input_hw, strides), strides)[0]
    )
    scores = jnp.sqrt(
        jax.nn.sigmoid(outputs["cls_logits"]) * jax.nn.sigmoid(outputs["centerness"])[..., None]
    )
    return dense.dense_postprocess(
        scores,
        outputs["ltrb"],
        lambda location, _, ltrb: boxes_ops.ltrb_decode(points[location], ltrb),
        image_hw,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
    )
