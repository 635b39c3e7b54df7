"""FCOS (Tian et al. 2019): its head, loss and post-processing, and its detector family.

Per level l with stride s_l, for every feature-map location:
  class logits [C]      from the classification tower (bias initialised to the 0.01 prior);
  ltrb distances [4]    relu(scale_l * t) * s_l in pixels, scale_l learned per level
                        (``exp`` in place of ``relu`` with ``config.fcos.box_activation``);
  centerness logit [1]  from the regression tower.
Towers and prediction convs are ``single_stage.tower_head``'s (binary towers in 1-bit variants,
real prediction convs).

Outputs are flattened level by level, row-major within a level, which is the point order of
``dfrdet_jax.ops.points.fcos_points``. The family 'fcos' reads ``config.fcos`` (see
``configs/fcos_r18.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfrdet_jax.choices import check_choice
from dfrdet_jax.losses import focal, iou
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import family, single_stage
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import fcos_assign, host_targets, nms
from dfrdet_jax.ops import points as points_ops

Array = jax.Array

# How a (point, class) pair is scored and thresholded at inference (``config.fcos.score_mode``):
#   'mmdet'        the sigmoid class score must exceed the threshold; the detection's score is
#                  class score x centerness (after the threshold, which the product does not
#                  face). mmdetection 2.x, the paper's codebase family: FCOSHead._get_bboxes_single
#                  (mmdet/models/dense_heads/fcos_head.py, v2.0-2.17) hands the class scores and
#                  the centerness to multiclass_nms(..., score_factors=centerness)
#                  (mmdet/core/post_processing/bbox_nms.py): `valid_mask = scores > score_thr`,
#                  then `scores = scores * score_factors`; later 2.x releases (about v2.18 on)
#                  do the same in BaseDenseHead._get_bboxes_single
#                  (mmdet/models/dense_heads/base_dense_head.py): filter_scores_and_topk(scores,
#                  score_thr, ...) on the class scores, then _bbox_post_process (`mlvl_scores *
#                  mlvl_score_factors`, under a "TODO: Add sqrt operation in order to be
#                  consistent with the paper", then batched_nms with no further threshold). Its
#                  FCOS configs use score_thr 0.05.
#   'torchvision'  score = sqrt(class score x centerness), and that score must exceed the
#                  threshold: torchvision's FCOS.postprocess_detections
#                  (torchvision/models/detection/fcos.py), whose own default score_thresh is 0.2.
# The same threshold thus keeps far more pairs under 'torchvision' (sqrt(s * c) > 0.05 is
# s * c > 0.0025) and reports higher scores. Both rank the pre-NMS top-k by their reported score;
# mmdetection ranks its nms_pre (1,000 per level) by class score x centerness (v2.0-2.17) or by
# the class score (v2.18+), torchvision by the sqrt score (1,000 per level); here one top-k,
# ``config.postprocess.pre_nms_top_k``, is taken over all levels.
SCORE_MODES = ("mmdet", "torchvision")

# How the regression tower's output t becomes the ltrb distances, in strides
# (``config.fcos.box_activation``); the head multiplies them by the level's stride:
#   'relu'  relu(scale * t): mmdetection's norm_on_bbox (FCOSHead.forward_single clamps at 0)
#           and torchvision's FCOSRegressionHead. A distance whose output falls below 0 for
#           every point gets no gradient and cannot recover (a dead unit).
#   'exp'   exp(scale * t), the FCOS paper's exp(s_i x) (mmdetection without norm_on_bbox), here
#           in strides: every output keeps a gradient. The exponent is capped at
#           ``EXP_BOX_MAX_EXPONENT`` (e^8 strides is past any image) so that it cannot overflow.
BOX_ACTIVATIONS = ("relu", "exp")
EXP_BOX_MAX_EXPONENT = 8.0


def box_distances(t: Array, scale: Array, stride: int, activation: str) -> Array:
    """The regression tower's output t [..., 4] -> ltrb distances [..., 4] in pixels (float32),
    as ``BOX_ACTIVATIONS`` says."""
    _check_box_activation(activation)
    x = scale * t.astype(jnp.float32)
    if activation == "relu":
        return nn.relu(x) * stride
    return jnp.exp(jnp.minimum(x, EXP_BOX_MAX_EXPONENT)) * stride


class FCOSHead(nn.Module):
    """Attributes:
    num_classes: number of foreground classes.
    strides: stride of each input level, px, in the order the levels are given.
    width: tower channels.
    num_convs: convs per tower.
    prior_prob: initial foreground probability of the classifier.
    binary: binarization of the tower convs.
    dtype: computation dtype.
    input_norm: a GroupNorm on every level before the towers (``single_stage.tower_head``).
    level_norms: the towers' norms of their own per level (``single_stage.tower_head``).
    box_activation: 'relu' or 'exp' (``BOX_ACTIVATIONS``).
    """

    num_classes: int
    strides: Sequence[int]
    width: int
    num_convs: int
    prior_prob: float = single_stage.PRIOR_PROB
    binary: BinarySpec = REAL
    dtype: Any = None
    input_norm: bool = False
    level_norms: bool = False
    box_activation: str = "relu"

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_classes: int, binary: BinarySpec, dtype: Any
    ) -> FCOSHead:
        """The head of ``config.model`` (tower width, convs per tower, levels)."""
        return cls(
            num_classes,
            family.strides(config),
            family.head_width(config),
            config.model.head_convs,
            binary=binary,
            dtype=dtype,
            input_norm=config.model.head_input_norm,
            level_norms=config.model.head_level_norms,
            box_activation=config.fcos.box_activation,
        )

    @property
    def takes_deferred_levels(self) -> bool:
        return single_stage.takes_deferred_levels(self.binary, self.input_norm)

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> dict[str, Array]:
        """levels: one [B, h_l, w_l, C] map per stride -> {'cls_logits': [B, P, num_classes],
        'ltrb': [B, P, 4] pixels, 'centerness': [B, P]} with P = sum_l h_l * w_l (float32)."""
        if len(levels) != len(self.strides):
            raise ValueError(f"FCOSHead got {len(levels)} levels for {len(self.strides)} strides")
        outputs = single_stage.tower_head(
            levels,
            train,
            num_classes=self.num_classes,
            num_anchors=1,
            box_outputs={"bbox_pred": 4, "centerness": 1},
            width=self.width,
            num_convs=self.num_convs,
            prior_prob=self.prior_prob,
            binary=self.binary,
            dtype=self.dtype,
            input_norm=self.input_norm,
            level_norms=self.level_norms,
        )
        scales = self.param("level_scales", nn.initializers.ones, (len(self.strides),))
        ltrb = [
            box_distances(t, scale, stride, self.box_activation)
            for t, scale, stride in zip(outputs["bbox_pred"], scales, self.strides, strict=True)
        ]
        outputs = {
            "cls_logits": outputs["cls_logits"],
            "ltrb": ltrb,
            "centerness": [c[..., 0] for c in outputs["centerness"]],
        }
        return {k: jnp.concatenate(v, axis=1).astype(jnp.float32) for k, v in outputs.items()}


def _pipeline_targets_of_batch(batch, points, num_classes: int):
    """``fcos_assign.fcos_targets``' targets [B, P, ...] from the assignment the input pipeline
    made (``single_stage.pipeline_ground_truth``), or None when the batch has none."""
    truth = single_stage.pipeline_ground_truth(batch, points.shape[0], num_classes)
    if truth is None:
        return None
    positive = truth["positive"]
    ltrb = boxes_ops.ltrb_encode(jnp.asarray(points)[None], truth["boxes"])
    ltrb = jnp.where(positive[..., None], ltrb, 0.0)
    return {
        "labels": truth["labels"],
        "box_targets": jnp.where(positive[..., None], truth["boxes"], 0.0),
        "ltrb_targets": ltrb,
        "centerness": jnp.where(positive, boxes_ops.centerness_target(ltrb), 0.0),
        "positive": positive,
        "ignore": truth["ignore"],
    }


def fcos_loss(
    outputs: dict[str, Array],
    batch: dict[str, Array],
    *,
    strides: Sequence[int],
    regress_ranges,
    num_classes: int,
    center_sampling: bool,
    center_radius: float,
    focal_alpha: float,
    focal_gamma: float,
    chunk_size: int | None,
) -> dict[str, Array]:
    """FCOS detection loss of a batch: focal + GIoU + centerness, as mmdetection's FCOSHead.

    Normalisation: the focal and centerness sums are divided by the number of positive points in
    the whole (global) batch; the GIoU sum, weighted by each positive's centerness target, by the
    sum of those targets.

    Args:
      outputs: head outputs, 'cls_logits' [B, P, C], 'ltrb' [B, P, 4] px, 'centerness' [B, P].
      batch: the standard batch ('image' [B, H, W, 3], 'boxes', 'labels', 'box_valid', 'ignore');
        with ``single_stage.MATCHED_SLOT`` [B, P] (assigned in the input pipeline) the targets
        come from it and the assignment settings are not read.
      strides, regress_ranges ([L, 2] px), num_classes, center_sampling, center_radius, chunk_size:
        target assignment settings, see ``dfrdet_jax.ops.fcos_assign.fcos_targets``.
      focal_alpha, focal_gamma: focal loss settings.

    Returns:
      {'loss_cls', 'loss_box', 'loss_centerness', 'num_positive'} float32 scalars.
    """
    points, level = points_ops.fcos_flat_points(
        single_stage.feature_sizes(batch["image"].shape[1:3], strides), strides
    )
    targets = _pipeline_targets_of_batch(batch, points, num_classes)
    if targets is None:
        targets = jax.vmap(
            lambda boxes, labels, valid, ignore: fcos_assign.fcos_targets(
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
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
    score_mode: str = "mmdet",
) -> nms.Detections:
    """Boxes, scores and classes of a batch, static-shape and jit-compatible.

    With s = sigmoid(class logit) and c = sigmoid(centerness logit) of a (point, class) pair
    (``SCORE_MODES`` above):
      'mmdet'        candidates s > ``score_threshold``, scored s * c (mmdetection);
      'torchvision'  scored sqrt(s * c), candidates sqrt(s * c) > ``score_threshold``.
    The ``pre_nms_top_k`` best candidates of each image by that score go through class-wise NMS.
    Boxes are clipped to the valid (unpadded) region of each image.

    Args:
      outputs: head outputs as in ``fcos_loss``.
      image_hw: int [B, 2] valid (h, w) of each image in px.
      input_hw: static (H, W) of the padded input.
      strides: the head's strides.
      score_mode: 'mmdet' (the default, as ``config.fcos.score_mode``) or 'torchvision'.

    Returns:
      ``Detections`` with a leading batch axis: boxes [B, D, 4] px of the padded input, scores
      [B, D], classes [B, D], valid [B, D], D = max_detections.
    """
    points = jnp.asarray(
        points_ops.fcos_flat_points(single_stage.feature_sizes(input_hw, strides), strides)[0]
    )
    _check_score_mode(score_mode)
    cls_scores = jax.nn.sigmoid(outputs["cls_logits"])
    product = cls_scores * jax.nn.sigmoid(outputs["centerness"])[..., None]
    if score_mode == "mmdet":
        scores, threshold_scores = product, cls_scores
    else:
        scores = threshold_scores = jnp.sqrt(product)
    return single_stage.dense_postprocess(
        scores,
        outputs["ltrb"],
        lambda location, _, ltrb: boxes_ops.ltrb_decode(points[location], ltrb),
        image_hw,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
        threshold_scores=threshold_scores,
    )


def _check_score_mode(score_mode) -> None:
    check_choice(
        "config.fcos.score_mode",
        score_mode,
        SCORE_MODES,
        "'mmdet': class score > threshold, scored class x centerness; 'torchvision': "
        "sqrt(class x centerness) > threshold, scored so",
    )


def _check_box_activation(activation) -> None:
    check_choice(
        "config.fcos.box_activation",
        activation,
        BOX_ACTIVATIONS,
        "'relu': relu(s t) x stride, mmdetection's and torchvision's; 'exp': exp(s t) x "
        "stride, the FCOS paper's",
    )


# The 'fcos' family ------------------------------------------------------------------------------


def _loss(config, outputs, batch):
    f = config.fcos
    return fcos_loss(
        outputs,
        batch,
        strides=family.strides(config),
        regress_ranges=np.asarray(f.regress_ranges),
        num_classes=outputs["cls_logits"].shape[-1],
        center_sampling=f.center_sampling,
        center_radius=f.center_radius,
        focal_alpha=f.focal_alpha,
        focal_gamma=f.focal_gamma,
        chunk_size=f.assign_chunk_size,
    )


def _pipeline_targets(config) -> single_stage.PipelineTargets | None:
    """The points assigned in the input pipeline (``host_targets.PointAssigner`` at
    config.data.image_size) when config.fcos.targets_in_pipeline, else None."""
    f = config.fcos
    if not f.targets_in_pipeline:
        return None
    return single_stage.input_size_targets(
        config,
        host_targets.PointAssigner,
        regress_ranges=np.asarray(f.regress_ranges),
        center_sampling=f.center_sampling,
        center_radius=f.center_radius,
    )


def _postprocess(config, outputs, batch):
    return fcos_postprocess(
        outputs,
        batch["image_hw"],
        input_hw=batch["image"].shape[1:3],
        strides=family.strides(config),
        score_mode=config.fcos.score_mode,
        **family.nms_settings(config),
    )


def _validate(config) -> None:
    _check_score_mode(config.fcos.get("score_mode"))
    _check_box_activation(config.fcos.get("box_activation"))
    levels = len(family.strides(config))
    if len(config.fcos.regress_ranges) != levels:
        raise ValueError(
            f"config.fcos.regress_ranges has {len(config.fcos.regress_ranges)} ranges "
            f"for {levels} FPN levels"
        )


family.register(
    "fcos",
    family.DetectorFamily(
        build_head=FCOSHead.from_config,
        loss=_loss,
        postprocess=_postprocess,
        validate=_validate,
        pipeline_targets=_pipeline_targets,
    ),
)
