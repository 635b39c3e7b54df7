"""RetinaNet (Lin et al. 2017): its head, loss and post-processing, and its detector family.

For every feature-map cell and each of its K anchors (``dfrdet_jax.ops.anchors``):
  class logits [C]   from the classification tower (bias initialised to the 0.01 prior);
  deltas [4]         (dx, dy, dw, dh) of the box relative to the anchor (``ops.boxes``'s coder,
                     with the configured weights), from the regression tower.
Towers and prediction convs are ``single_stage.tower_head``'s (binary towers in 1-bit variants,
real prediction convs). Outputs are flattened level by level, row-major within a level, anchors
of a cell last: the order of ``anchors.anchor_grid``. The family 'retinanet' reads
``config.retinanet`` (see ``configs/retinanet_r18.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfrdet_jax.choices import check_choice
from dfrdet_jax.losses import focal, iou, smooth_l1
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import family, single_stage
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import host_targets, matcher, nms

Array = jax.Array
BOX_LOSSES = ("smooth_l1", "giou")


def check_box_loss(box_loss: str, what: str) -> None:
    """ValueError naming ``what`` for a box loss not in ``BOX_LOSSES``."""
    check_choice(what, box_loss, BOX_LOSSES)


class RetinaNetHead(nn.Module):
    """Attributes:
    num_classes: number of foreground classes.
    num_anchors: K, anchors per feature-map cell.
    width: tower channels.
    num_convs: convs per tower.
    prior_prob: initial foreground probability of the classifier.
    binary: binarization of the tower convs.
    dtype: computation dtype.
    input_norm: a GroupNorm on every level before the towers (``single_stage.tower_head``).
    level_norms: the towers' norms of their own per level (``single_stage.tower_head``).
    """

    num_classes: int
    num_anchors: int
    width: int
    num_convs: int
    prior_prob: float = single_stage.PRIOR_PROB
    binary: BinarySpec = REAL
    dtype: Any = None
    input_norm: bool = False
    level_norms: bool = False

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_classes: int, binary: BinarySpec, dtype: Any
    ) -> RetinaNetHead:
        """The head of ``config.model`` (tower width, convs per tower) with the anchors per cell of
        ``config.retinanet``."""
        r = config.retinanet
        return cls(
            num_classes,
            anchors_ops.anchors_per_cell(r.scales_per_octave, tuple(r.aspect_ratios)),
            family.head_width(config),
            config.model.head_convs,
            binary=binary,
            dtype=dtype,
            input_norm=config.model.head_input_norm,
            level_norms=config.model.head_level_norms,
        )

    @property
    def takes_deferred_levels(self) -> bool:
        return single_stage.takes_deferred_levels(self.binary, self.input_norm)

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> dict[str, Array]:
        """levels: [B, h_l, w_l, C] maps -> {'cls_logits': [B, A, num_classes], 'deltas':
        [B, A, 4]} with A = K * sum_l h_l * w_l (float32)."""
        outputs = single_stage.tower_head(
            levels,
            train,
            num_classes=self.num_classes,
            num_anchors=self.num_anchors,
            box_outputs={"bbox_pred": 4},
            width=self.width,
            num_convs=self.num_convs,
            prior_prob=self.prior_prob,
            binary=self.binary,
            dtype=self.dtype,
            input_norm=self.input_norm,
            level_norms=self.level_norms,
        )
        outputs = {"cls_logits": outputs["cls_logits"], "deltas": outputs["bbox_pred"]}
        return {k: jnp.concatenate(v, axis=1).astype(jnp.float32) for k, v in outputs.items()}


def anchor_targets(
    batch: dict[str, Array], anchors: Array, num_classes: int, **matching
) -> dict[str, Array]:
    """Max-IoU targets of every image of ``batch`` (the standard batch's 'boxes', 'labels',
    'box_valid', 'ignore' [B, N]) for ``anchors`` [A, 4]: ``matcher.max_iou_targets`` (whose
    keyword settings ``matching`` are, see ``matching_settings``) vmapped, each output [B, A, ...].
    """
    return jax.vmap(
        lambda boxes, labels, valid, ignore: matcher.max_iou_targets(
            anchors, boxes, labels, valid, ignore, num_classes, **matching
        )
    )(batch["boxes"], batch["labels"], batch["box_valid"], batch["ignore"])


def retinanet_loss(
    outputs: dict[str, Array],
    batch: dict[str, Array],
    *,
    anchors: np.ndarray,
    num_classes: int,
    positive_iou: float,
    negative_iou: float,
    low_quality_matches: bool,
    ignore_iof: float,
    focal_alpha: float,
    focal_gamma: float,
    box_loss: str,
    smooth_l1_beta: float,
    box_weights: Sequence[float],
    chunk_size: int | None,
) -> dict[str, Array]:
    """RetinaNet detection loss of a batch: focal loss + box loss, both divided by the number of
    positive anchors in the whole (global) batch.

    Args:
      outputs: head outputs, 'cls_logits' [B, A, C], 'deltas' [B, A, 4].
      batch: the standard batch ('boxes', 'labels', 'box_valid', 'ignore'); with
        ``single_stage.MATCHED_SLOT`` [B, A] (matched in the input pipeline) the targets come
        from it and the matching settings are not read.
      anchors: float32 [A, 4] xyxy px (``anchors.anchor_grid`` of the batch's image size).
      positive_iou, negative_iou, low_quality_matches, ignore_iof, chunk_size: matching, see
        ``dfrdet_jax.ops.matcher.max_iou_targets``.
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
    targets = single_stage.pipeline_ground_truth(batch, anchors.shape[0], num_classes)
    if targets is not None:  # non-positive anchors target themselves, as anchor_targets'
        targets["box_targets"] = jnp.where(
            targets["positive"][..., None], targets.pop("boxes"), anchors
        )
    else:
        targets = anchor_targets(
            batch,
            anchors,
            num_classes,
            positive_iou=positive_iou,
            negative_iou=negative_iou,
            low_quality_matches=low_quality_matches,
            ignore_iof=ignore_iof,
            chunk_size=chunk_size,
        )
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
    box_weights: Sequence[float],
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
) -> nms.Detections:
    """Boxes, scores (sigmoid of the class logits) and classes of a batch, static-shape: the
    ``pre_nms_top_k`` best (anchor, class) pairs of each image above ``score_threshold`` are
    decoded, clipped to the valid region (``image_hw`` int [B, 2]) and go through class-wise NMS.

    Returns ``Detections`` with a leading batch axis (see ``single_stage.dense_postprocess``).
    """
    anchors = jnp.asarray(anchors)
    return single_stage.dense_postprocess(
        jax.nn.sigmoid(outputs["cls_logits"]),
        outputs["deltas"],
        lambda location, _, deltas: boxes_ops.delta_decode(anchors[location], deltas, box_weights),
        image_hw,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
    )


# The 'retinanet' family -------------------------------------------------------------------------


def _anchor_settings(config) -> dict:
    r = config.retinanet
    return {
        "octave_base_scale": r.octave_base_scale,
        "scales_per_octave": r.scales_per_octave,
        "aspect_ratios": tuple(r.aspect_ratios),
    }


def _anchors(config, batch) -> np.ndarray:
    """Anchors float32 [A, 4] xyxy px of ``config.retinanet`` for the batch's input size."""
    strides = family.strides(config)
    anchors, _ = anchors_ops.anchor_grid(
        single_stage.feature_sizes(batch["image"].shape[1:3], strides),
        strides,
        **_anchor_settings(config),
    )
    return anchors


def matching_settings(config) -> dict:
    """The keyword settings of ``matcher.max_iou_targets`` in ``config.retinanet``."""
    r = config.retinanet
    return {
        "positive_iou": r.positive_iou,
        "negative_iou": r.negative_iou,
        "low_quality_matches": r.low_quality_matches,
        "ignore_iof": r.ignore_iof,
        "chunk_size": r.assign_chunk_size,
    }


def _pipeline_targets(config) -> single_stage.PipelineTargets | None:
    """The anchors matched in the input pipeline (``host_targets.AnchorMatcher`` at
    config.data.image_size) when config.retinanet.targets_in_pipeline, else None."""
    if not config.retinanet.targets_in_pipeline:
        return None
    settings = matching_settings(config)
    settings.pop("chunk_size")
    return single_stage.input_size_targets(
        config, host_targets.AnchorMatcher, **_anchor_settings(config), **settings
    )


def _loss(config, outputs, batch):
    r = config.retinanet
    return retinanet_loss(
        outputs,
        batch,
        anchors=_anchors(config, batch),
        num_classes=outputs["cls_logits"].shape[-1],
        focal_alpha=r.focal_alpha,
        focal_gamma=r.focal_gamma,
        box_loss=r.box_loss,
        smooth_l1_beta=r.smooth_l1_beta,
        box_weights=tuple(r.box_weights),
        **matching_settings(config),
    )


def _postprocess(config, outputs, batch):
    return retinanet_postprocess(
        outputs,
        batch["image_hw"],
        anchors=_anchors(config, batch),
        box_weights=tuple(config.retinanet.box_weights),
        **family.nms_settings(config),
    )


def _validate(config) -> None:
    r = config.retinanet
    check_box_loss(r.box_loss, "config.retinanet.box_loss")
    matcher.check_iou_thresholds(r.negative_iou, r.positive_iou, "config.retinanet")
    anchors_ops.anchor_shapes(4, **_anchor_settings(config))


family.register(
    "retinanet",
    family.DetectorFamily(
        build_head=RetinaNetHead.from_config,
        loss=_loss,
        postprocess=_postprocess,
        validate=_validate,
        pipeline_targets=_pipeline_targets,
    ),
)
