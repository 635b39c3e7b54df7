"""Faster R-CNN's two stages over an FPN (Ren et al. 2015; Lin et al. 2017), as one head module.

Training (``targets`` given, ``train=True``): the RPN predicts objectness and deltas per anchor;
its targets are drawn (``rpn.rpn_targets``); proposals (``rpn.rpn_proposals``, no gradient) plus
the ground truth are sampled into RoIs (``roi_head.sample_rois``), pooled with RoIAlign from the
level each RoI's size picks (``ops.roi_align.roi_levels``) and classified by ``RoIBoxHead``. The
outputs carry the predictions and their targets; ``faster_rcnn_loss`` only compares them. The
random draws use the 'sampling' PRNG stream (``model.apply(..., rngs={'sampling': key})``).

Inference: the box head runs on every kept proposal; ``roi_head.roi_postprocess`` turns that into
detections. Every shape is static: proposals, RoIs and detections are fixed-size with masks.

The family 'faster_rcnn' reads ``config.faster_rcnn`` (see ``configs/faster_rcnn_r18.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import family, roi_head, rpn, single_stage
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import host_targets, matcher, nms, roi_align

Array = jax.Array
# Delta coder weights of the RPN's anchors and of the box head's RoIs (as mmdetection, detectron2).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Anchors and RoIs at least this much inside an ignore region (intersection / own area) are
# ignored, in both stages.
IGNORE_IOF = 0.5


class FasterRCNNHead(nn.Module):
    """Attributes (from ``rpn_octave_base_scale`` to ``assign_chunk_size``: the
    ``config.faster_rcnn`` fields of the same names, see ``configs/faster_rcnn_r18.py``):
    num_classes: foreground classes.
    strides: stride of each input level, px (P2..P6: 4..64).
    width: RPN conv channels (``family.head_width``).
    rpn_octave_base_scale, rpn_scales_per_octave, rpn_aspect_ratios: the RPN's anchors (see
      ``ops.anchors.anchor_shapes``).
    rpn_positive_iou, rpn_negative_iou: the RPN's matching thresholds.
    rpn_num_samples, rpn_positive_fraction: anchors drawn per image, and their positive share at
      most.
    rpn_pre_nms_top_k_per_level_train, rpn_post_nms_top_k_train: proposals while training (the
      RoIs are drawn from them).
    rpn_pre_nms_top_k_per_level_test, rpn_post_nms_top_k_test: proposals at inference (the box
      head classifies each).
    rpn_nms_iou, rpn_min_size: both (see ``rpn.rpn_proposals``).
    roi_num_samples, roi_positive_fraction, roi_positive_iou, roi_negative_iou: RoI sampling
      (see ``roi_head.sample_rois``).
    roi_output_size, roi_sampling_ratio, roi_canonical_level: RoIAlign and the level an RoI is
      pooled from (see ``ops.roi_align``).
    fc_width: width of the box head's two hidden layers.
    assign_chunk_size: anchors matched at a time (``matcher.max_iou_targets``).
    binary: binarization of the RPN conv and the two hidden box-head layers.
    input_norm: a GroupNorm on every level before the RPN and RoIAlign
      (``single_stage.normalized_levels``): the RPN conv is a 1-bit unit with a shortcut.
    level_norms: the RPN conv's norms of their own per level (``rpn.RPNHead``).
    dtype: computation dtype.
    """

    num_classes: int
    strides: Sequence[int]
    width: int
    rpn_octave_base_scale: float
    rpn_scales_per_octave: int
    rpn_aspect_ratios: Sequence[float]
    rpn_positive_iou: float
    rpn_negative_iou: float
    rpn_num_samples: int
    rpn_positive_fraction: float
    rpn_pre_nms_top_k_per_level_train: int
    rpn_post_nms_top_k_train: int
    rpn_pre_nms_top_k_per_level_test: int
    rpn_post_nms_top_k_test: int
    rpn_nms_iou: float
    rpn_min_size: float
    roi_num_samples: int
    roi_positive_fraction: float
    roi_positive_iou: float
    roi_negative_iou: float
    roi_output_size: int
    roi_sampling_ratio: int
    roi_canonical_level: int
    fc_width: int
    assign_chunk_size: int | None
    binary: BinarySpec = REAL
    input_norm: bool = False
    level_norms: bool = False
    dtype: Any = None

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_classes: int, binary: BinarySpec, dtype: Any
    ) -> FasterRCNNHead:
        """The head of ``config.faster_rcnn`` on the levels and width of ``config.model``."""
        f = config.faster_rcnn
        return cls(
            num_classes,
            family.strides(config),
            family.head_width(config),
            rpn_octave_base_scale=f.rpn_octave_base_scale,
            rpn_scales_per_octave=f.rpn_scales_per_octave,
            rpn_aspect_ratios=tuple(f.rpn_aspect_ratios),
            rpn_positive_iou=f.rpn_positive_iou,
            rpn_negative_iou=f.rpn_negative_iou,
            rpn_num_samples=f.rpn_num_samples,
            rpn_positive_fraction=f.rpn_positive_fraction,
            rpn_pre_nms_top_k_per_level_train=f.rpn_pre_nms_top_k_per_level_train,
            rpn_post_nms_top_k_train=f.rpn_post_nms_top_k_train,
            rpn_pre_nms_top_k_per_level_test=f.rpn_pre_nms_top_k_per_level_test,
            rpn_post_nms_top_k_test=f.rpn_post_nms_top_k_test,
            rpn_nms_iou=f.rpn_nms_iou,
            rpn_min_size=f.rpn_min_size,
            roi_num_samples=f.roi_num_samples,
            roi_positive_fraction=f.roi_positive_fraction,
            roi_positive_iou=f.roi_positive_iou,
            roi_negative_iou=f.roi_negative_iou,
            roi_output_size=f.roi_output_size,
            roi_sampling_ratio=f.roi_sampling_ratio,
            roi_canonical_level=f.roi_canonical_level,
            fc_width=f.fc_width,
            assign_chunk_size=f.assign_chunk_size,
            binary=binary,
            input_norm=config.model.head_input_norm,
            level_norms=config.model.head_level_norms,
            dtype=dtype,
        )

    @nn.compact
    def __call__(
        self, levels: Sequence[Array], train: bool, targets: dict[str, Array] | None = None
    ) -> dict[str, Array]:
        """levels: [B, h_l, w_l, C] maps. targets: the batch's 'boxes', 'labels', 'box_valid',
        'ignore' (training; 'matched_slot' too when the input pipeline matched the RPN's
        anchors) and 'image_hw' (clipping; default the whole input).

        Returns 'rpn_logits' [B, A], 'rpn_deltas' [B, A, 4], 'roi_cls_logits' [B, R, C + 1],
        'roi_deltas' [B, R, C, 4]; training adds 'rpn_targets' and 'roi_targets' (dicts of
        ``rpn_targets`` / ``sample_rois``), inference 'proposals' [B, R, 4] and
        'proposal_valid' [B, R], R = the configured number of RoIs (training) / kept
        proposals (inference, ``rpn_post_nms_top_k_test``).
        """
        if self.input_norm:
            levels = single_stage.normalized_levels(levels, self.dtype)
        batch = levels[0].shape[0]
        input_hw = (levels[0].shape[1] * self.strides[0], levels[0].shape[2] * self.strides[0])
        targets = targets or {}
        image_hw = targets.get("image_hw", jnp.tile(jnp.asarray(input_hw, jnp.int32), (batch, 1)))
        anchors = jnp.asarray(self.anchors([x.shape[1:3] for x in levels]))
        per_cell = anchors_ops.anchors_per_cell(self.rpn_scales_per_octave, self.rpn_aspect_ratios)

        outputs = rpn.RPNHead(
            per_cell,
            self.width,
            self.binary,
            self.dtype,
            self.level_norms,
            name="rpn",
        )(levels, train)
        training = train and "boxes" in targets
        # mmdetection's train_cfg.rpn_proposal while training, its test_cfg.rpn otherwise.
        if training:
            pre_nms, post_nms = (
                self.rpn_pre_nms_top_k_per_level_train,
                self.rpn_post_nms_top_k_train,
            )
        else:
            pre_nms, post_nms = self.rpn_pre_nms_top_k_per_level_test, self.rpn_post_nms_top_k_test
        proposals, _, proposal_valid = jax.vmap(
            lambda logits, deltas, hw: rpn.rpn_proposals(
                logits,
                deltas,
                anchors,
                tuple(per_cell * x.shape[1] * x.shape[2] for x in levels),
                hw,
                pre_nms_top_k_per_level=pre_nms,
                post_nms_top_k=post_nms,
                nms_iou=self.rpn_nms_iou,
                min_size=self.rpn_min_size,
                box_weights=RPN_BOX_WEIGHTS,
            )
        )(outputs["rpn_logits"], outputs["rpn_deltas"], image_hw)

        if training:
            rpn_key, roi_key = jax.random.split(self.make_rng("sampling"))
            gt = (targets["boxes"], targets["labels"], targets["box_valid"], targets["ignore"])
            outputs["rpn_targets"] = jax.vmap(
                lambda key, match: rpn.rpn_targets(
                    key,
                    anchors,
                    match,
                    num_samples=self.rpn_num_samples,
                    positive_fraction=self.rpn_positive_fraction,
                    box_weights=RPN_BOX_WEIGHTS,
                )
            )(jax.random.split(rpn_key, batch), self._match_anchors(anchors, targets))
            sampled = jax.vmap(
                lambda key, props, valid, boxes, labels, box_valid, ignore: roi_head.sample_rois(
                    key,
                    props,
                    valid,
                    boxes,
                    labels,
                    box_valid,
                    ignore,
                    self.num_classes,
                    num_samples=self.roi_num_samples,
                    positive_fraction=self.roi_positive_fraction,
                    positive_iou=self.roi_positive_iou,
                    negative_iou=self.roi_negative_iou,
                    ignore_iof=IGNORE_IOF,
                    box_weights=ROI_BOX_WEIGHTS,
                )
            )(jax.random.split(roi_key, batch), proposals, proposal_valid, *gt)
            outputs["roi_targets"] = sampled
            rois = sampled["rois"]
        else:
            rois = proposals
            outputs["proposals"] = proposals
            outputs["proposal_valid"] = proposal_valid

        # RoIs read P2..P5 at most: the top level only feeds the RPN (as detectron2's FPN).
        min_level = int(np.log2(self.strides[0]))
        pooled_levels = levels[: max(1, min(len(levels), 6 - min_level))]
        level_index = jax.vmap(
            lambda boxes: (
                roi_align.roi_levels(
                    boxes,
                    min_level,
                    min_level + len(pooled_levels) - 1,
                    canonical_level=self.roi_canonical_level,
                )
                - min_level
            )
        )(rois)
        regions = roi_align.batched_roi_align(
            pooled_levels,
            self.strides[: len(pooled_levels)],
            rois,
            level_index,
            self.roi_output_size,
            self.roi_sampling_ratio,
        )
        outputs.update(
            roi_head.RoIBoxHead(
                self.num_classes, self.fc_width, self.binary, self.dtype, name="roi_head"
            )(regions, train)
        )
        return outputs

    def _match_anchors(self, anchors: Array, targets: dict[str, Array]) -> dict[str, Array]:
        """The RPN's anchors [A, 4] matched to the batch's ground truth (``rpn.rpn_match``
        with a leading batch axis): read from the input pipeline's assignment when
        ``targets`` carries one (``single_stage.MATCHED_SLOT``), else matched here."""
        match = single_stage.pipeline_ground_truth(targets, anchors.shape[0], 1)
        if match is not None:
            return {key: match[key] for key in ("positive", "ignore", "boxes")}
        return jax.vmap(
            lambda boxes, valid, ignore: rpn.rpn_match(
                anchors,
                boxes,
                valid,
                ignore,
                positive_iou=self.rpn_positive_iou,
                negative_iou=self.rpn_negative_iou,
                ignore_iof=IGNORE_IOF,
                chunk_size=self.assign_chunk_size,
            )
        )(targets["boxes"], targets["box_valid"], targets["ignore"])

    def anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        return anchors_ops.anchor_grid(
            feature_sizes,
            self.strides,
            octave_base_scale=self.rpn_octave_base_scale,
            scales_per_octave=self.rpn_scales_per_octave,
            aspect_ratios=self.rpn_aspect_ratios,
        )[0]


def faster_rcnn_loss(outputs: dict[str, Array], smooth_l1_beta: float) -> dict[str, Array]:
    """L_det of Faster R-CNN: the RPN's and the box head's classification and box losses
    (``rpn.rpn_loss``, ``roi_head.roi_loss``) from training outputs, plus the counts drawn."""
    losses = rpn.rpn_loss(outputs, outputs["rpn_targets"], smooth_l1_beta)
    losses.update(roi_head.roi_loss(outputs, outputs["roi_targets"], smooth_l1_beta))
    losses["num_rpn_positive"] = outputs["rpn_targets"]["positive"].sum().astype(jnp.float32)
    losses["num_roi_positive"] = outputs["roi_targets"]["positive"].sum().astype(jnp.float32)
    return losses


def faster_rcnn_postprocess(
    outputs: dict[str, Array],
    image_hw: Array,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
) -> nms.Detections:
    """Detections from inference outputs, see ``roi_head.roi_postprocess``."""
    return roi_head.roi_postprocess(
        outputs,
        image_hw,
        box_weights=ROI_BOX_WEIGHTS,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        pre_nms_top_k=pre_nms_top_k,
    )


# The 'faster_rcnn' family -----------------------------------------------------------------------


def _loss(config, outputs, batch):
    del batch  # the targets were drawn inside the model (see registry.apply_kwargs)
    return faster_rcnn_loss(outputs, config.faster_rcnn.smooth_l1_beta)


def _postprocess(config, outputs, batch):
    return faster_rcnn_postprocess(outputs, batch["image_hw"], **family.nms_settings(config))


def _pipeline_targets(config) -> single_stage.PipelineTargets | None:
    """The RPN's anchors matched in the input pipeline (``host_targets.AnchorMatcher`` at
    config.data.image_size, the settings of ``rpn.rpn_match``) when
    config.faster_rcnn.targets_in_pipeline, else None. The RoIs are matched in the step: they
    are the RPN's proposals."""
    f = config.faster_rcnn
    if not f.targets_in_pipeline:
        return None
    return single_stage.input_size_targets(
        config,
        host_targets.AnchorMatcher,
        octave_base_scale=f.rpn_octave_base_scale,
        scales_per_octave=f.rpn_scales_per_octave,
        aspect_ratios=tuple(f.rpn_aspect_ratios),
        positive_iou=f.rpn_positive_iou,
        negative_iou=f.rpn_negative_iou,
        low_quality_matches=True,
        ignore_iof=IGNORE_IOF,
    )


def _validate(config) -> None:
    f = config.faster_rcnn
    for stage in ("rpn", "roi"):
        names = (f"{stage}_negative_iou", f"{stage}_positive_iou")
        matcher.check_iou_thresholds(f[names[0]], f[names[1]], "config.faster_rcnn", names)
    for stage in ("train", "test"):
        for name in (f"rpn_pre_nms_top_k_per_level_{stage}", f"rpn_post_nms_top_k_{stage}"):
            if f[name] < 1:
                raise ValueError(f"config.faster_rcnn.{name}={f[name]} must be at least 1")
    if f.roi_num_samples > f.rpn_post_nms_top_k_train:
        raise ValueError(
            f"config.faster_rcnn.roi_num_samples={f.roi_num_samples} exceeds the proposals it "
            f"is drawn from (rpn_post_nms_top_k_train={f.rpn_post_nms_top_k_train})"
        )
    anchors_ops.anchor_shapes(
        4, f.rpn_octave_base_scale, f.rpn_scales_per_octave, tuple(f.rpn_aspect_ratios)
    )


family.register(
    "faster_rcnn",
    family.DetectorFamily(
        build_head=FasterRCNNHead.from_config,
        loss=_loss,
        postprocess=_postprocess,
        validate=_validate,
        pipeline_targets=_pipeline_targets,
        needs_targets=True,
    ),
)
