"""Faster R-CNN's two stages over an FPN (Ren et al. 2015; Lin et al. 2017), as one head module.

Training (``targets`` given, ``train=True``): the RPN predicts objectness and deltas per anchor;
its targets are drawn (``rpn.rpn_targets``); proposals (``rpn.rpn_proposals``, no gradient) plus
the ground truth are sampled into RoIs (``roi_head.sample_rois``), pooled with RoIAlign from the
level each RoI's size picks (``ops.roi_align.roi_levels``) and classified by ``RoIBoxHead``. The
outputs carry the predictions and their targets; ``faster_rcnn_loss`` only compares them. The
random draws use the 'sampling' PRNG stream (``model.apply(..., rngs={'sampling': key})``).

Inference: the box head runs on every kept proposal; ``roi_head.roi_postprocess`` turns that into
detections. Every shape is static: proposals, RoIs and detections are fixed-size with masks.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.heads import roi_head, rpn
from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops import roi_align

Array = jax.Array
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class FasterRCNNHead(nn.Module):
    """Attributes:
    num_classes: foreground classes.
    strides: stride of each input level, px (P2..P6: 4..64).
    settings: the ``config.faster_rcnn`` section (anchors, RPN, RoI sampling and pooling sizes;
      see ``configs/faster_rcnn_r18.py``) as a ``flax.core.FrozenDict``.
    width: RPN conv channels (the FPN width).
    binary: binarization of the RPN conv and the two hidden box-head layers.
    dtype: computation dtype.
    """

    num_classes: int
    strides: Sequence[int]
    settings: Any
    width: int = 256
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(
        self, levels: Sequence[Array], train: bool, targets: dict[str, Array] | None = None
    ) -> dict[str, Array]:
        """levels: [B, h_l, w_l, C] maps. targets: the batch's 'boxes', 'labels', 'box_valid',
        'ignore' (training) and 'image_hw' (clipping; default the whole input).

        Returns 'rpn_logits' [B, A], 'rpn_deltas' [B, A, 4], 'roi_cls_logits' [B, R, C + 1],
        'roi_deltas' [B, R, C, 4]; training adds 'rpn_targets' and 'roi_targets' (dicts of
        ``rpn_targets`` / ``sample_rois``), inference 'proposals' [B, R, 4] and
        'proposal_valid' [B, R], R = the configured number of RoIs / kept proposals.
        """
        s = self.settings
        batch = levels[0].shape[0]
        input_hw = (levels[0].shape[1] * self.strides[0], levels[0].shape[2] * self.strides[0])
        targets = targets or {}
        image_hw = targets.get("image_hw", jnp.tile(jnp.asarray(input_hw, jnp.int32), (batch, 1)))
        anchors = jnp.asarray(self.anchors([x.shape[1:3] for x in levels]))

        outputs = rpn.RPNHead(
            anchors_ops.anchors_per_cell(s["rpn_scales_per_octave"], s["rpn_aspect_ratios"]),
            self.width,
            self.binary,
            self.dtype,
            name="rpn",
        )(levels, train)
        training = train and "boxes" in targets
        proposals, _, proposal_valid = jax.vmap(
            lambda logits, deltas, hw: rpn.rpn_proposals(
                logits,
                deltas,
                anchors,
                hw,
                pre_nms_top_k=s["rpn_pre_nms_top_k"],
                post_nms_top_k=s["rpn_post_nms_top_k"],
                nms_iou=s["rpn_nms_iou"],
                min_size=s["rpn_min_size"],
                box_weights=RPN_BOX_WEIGHTS,
            )
        )(outputs["rpn_logits"], outputs["rpn_deltas"], image_hw)

        if training:
            rpn_key, roi_key = jax.random.split(self.make_rng("sampling"))
            gt = (targets["boxes"], targets["labels"], targets["box_valid"], targets["ignore"])
            outputs["rpn_targets"] = jax.vmap(
                lambda key, boxes, valid, ignore: rpn.rpn_targets(
                    key,
                    anchors,
                    boxes,
                    valid,
                    ignore,
                    positive_iou=s["rpn_positive_iou"],
                    negative_iou=s["rpn_negative_iou"],
                    num_samples=s["rpn_num_samples"],
                    positive_fraction=s["rpn_positive_fraction"],
                    box_weights=RPN_BOX_WEIGHTS,
                    chunk_size=s["assign_chunk_size"],
                )
            )(jax.random.split(rpn_key, batch), gt[0], gt[2], gt[3])
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
                    num_samples=s["roi_num_samples"],
                    positive_fraction=s["roi_positive_fraction"],
                    positive_iou=s["roi_positive_iou"],
                    negative_iou=s["roi_negative_iou"],
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
                    canonical_level=s["roi_canonical_level"],
                )
                - min_level
            )
        )(rois)
        regions = roi_align.batched_roi_align(
            pooled_levels,
            self.strides[: len(pooled_levels)],
            rois,
            level_index,
            s["roi_output_size"],
            s["roi_sampling_ratio"],
        )
        outputs.update(
            roi_head.RoIBoxHead(
                self.num_classes, s["fc_width"], self.binary, self.dtype, name="roi_head"
            )(regions, train)
        )
        return outputs

    def anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        s = self.settings
        return anchors_ops.anchor_grid(
            feature_sizes,
            self.strides,
            octave_base_scale=s["rpn_octave_base_scale"],
            scales_per_octave=s["rpn_scales_per_octave"],
            aspect_ratios=s["rpn_aspect_ratios"],
        )[0]


def faster_rcnn_loss(outputs: dict[str, Array], smooth_l1_beta: float = 0.0) -> dict[str, Array]:
    """L_det of Faster R-CNN: the RPN's and the box head's classification and box losses
    (``rpn.rpn_loss``, ``roi_head.roi_loss``) from training outputs, plus the counts drawn."""
    losses = rpn.rpn_loss(outputs, outputs["rpn_targets"], smooth_l1_beta)
    losses.update(roi_head.roi_loss(outputs, outputs["roi_targets"], smooth_l1_beta))
    losses["num_rpn_positive"] = outputs["rpn_targets"]["positive"].sum().astype(jnp.float32)
    losses["num_roi_positive"] = outputs["roi_targets"]["positive"].sum().astype(jnp.float32)
    return losses


def faster_rcnn_postprocess(outputs, image_hw, **nms_settings):
    """Detections from inference outputs, see ``roi_head.roi_postprocess``."""
    return roi_head.roi_postprocess(outputs, image_hw, box_weights=ROI_BOX_WEIGHTS, **nms_settings)
