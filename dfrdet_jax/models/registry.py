"""Detector families by name: how to build each from a config, its loss and its post-processing.

Training and evaluation code calls only ``build_model``, ``detection_loss`` and ``postprocess``;
a new family registers a ``DetectorFamily`` here instead of adding ``if name == ...`` branches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfrdet_jax.losses import dfr
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.detectors import Detector, level_strides
from dfrdet_jax.models.heads import faster_rcnn as faster_rcnn_head
from dfrdet_jax.models.heads import fcos as fcos_head
from dfrdet_jax.models.heads import retinanet as retinanet_head
from dfrdet_jax.ops.anchors import anchor_shapes, anchors_per_cell
from dfrdet_jax.ops.assign import check_iou_thresholds

Array = jax.Array
BINARY_PARTS = ("backbone", "neck", "head")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DetectorFamily:
    """build(config, num_classes) -> module; loss(config, outputs, batch) -> dict of scalars whose
    'loss_*' entries sum to L_det (others are reported as metrics); postprocess(config, outputs,
    batch) -> ``dfrdet_jax.ops.nms.Detections`` with a leading batch axis; validate(config) raises
    ValueError for a bad setting of the family's own config section. A family that
    ``needs_targets`` is applied with ``apply_kwargs`` (ground truth and a 'sampling' PRNG key)."""

    build: Callable[[ml_collections.ConfigDict, int], Any]
    loss: Callable[..., dict[str, Array]]
    postprocess: Callable[..., Any]
    validate: Callable[[ml_collections.ConfigDict], None]
    needs_targets: bool = False  # two-stage: the model samples RoIs from the ground truth


def binary_spec(config: ml_collections.ConfigDict, part: str) -> BinarySpec:
    """The BinarySpec of ``part`` ('backbone', 'neck' or 'head') from ``config.model``."""
    if part not in config.model.binary_parts:
        return REAL
    return BinarySpec(enabled=True, **config.model.binary.to_dict())


def model_dtype(config: ml_collections.ConfigDict):
    try:
        return DTYPES[config.model.dtype]
    except KeyError:
        raise ValueError(
            f"Unknown config.model.dtype {config.model.dtype!r}; valid choices: {sorted(DTYPES)}"
        ) from None


def _detector(config: ml_collections.ConfigDict, head) -> Detector:
    """The backbone, neck and decoder of ``config.model`` / ``config.dfr`` around ``head``."""
    m = config.model
    return Detector(
        head=head,
        depth=m.depth,
        backbone_width=m.backbone_width,
        fpn_width=m.fpn_width,
        min_level=m.min_level,
        max_level=m.max_level,
        backbone_binary=binary_spec(config, "backbone"),
        neck_binary=binary_spec(config, "neck"),
        decoder_levels=tuple(config.dfr.levels),
        decoder_width=config.dfr.decoder_width,
        decoder_blocks=config.dfr.decoder_blocks,
        dtype=model_dtype(config),
    )


def _strides(config) -> tuple[int, ...]:
    return level_strides(config.model.min_level, config.model.max_level)


def _nms_settings(config) -> dict[str, Any]:
    p = config.postprocess
    return dict(
        score_threshold=p.score_threshold,
        iou_threshold=p.nms_iou_threshold,
        max_detections=p.max_detections,
        pre_nms_top_k=p.pre_nms_top_k,
    )


# FCOS ----------------------------------------------------------------------------------------


def _build_fcos(config: ml_collections.ConfigDict, num_classes: int) -> Detector:
    m = config.model
    head = fcos_head.FCOSHead(
        num_classes,
        _strides(config),
        m.fpn_width,
        m.head_convs,
        binary=binary_spec(config, "head"),
        dtype=model_dtype(config),
    )
    return _detector(config, head)


def _fcos_loss(config, outputs, batch):
    f = config.fcos
    return fcos_head.fcos_loss(
        outputs,
        batch,
        strides=_strides(config),
        regress_ranges=np.asarray(f.regress_ranges),
        num_classes=outputs["cls_logits"].shape[-1],
        center_sampling=f.center_sampling,
        center_radius=f.center_radius,
        focal_alpha=f.focal_alpha,
        focal_gamma=f.focal_gamma,
        chunk_size=f.assign_chunk_size,
    )


def _fcos_postprocess(config, outputs, batch):
    return fcos_head.fcos_postprocess(
        outputs,
        batch["image_hw"],
        input_hw=batch["image"].shape[1:3],
        strides=_strides(config),
        **_nms_settings(config),
    )


def _validate_fcos(config) -> None:
    levels = len(_strides(config))
    if len(config.fcos.regress_ranges) != levels:
        raise ValueError(
            f"config.fcos.regress_ranges has {len(config.fcos.regress_ranges)} ranges "
            f"for {levels} FPN levels"
        )


# RetinaNet -----------------------------------------------------------------------------------


def _build_retinanet(config: ml_collections.ConfigDict, num_classes: int) -> Detector:
    m, r = config.model, config.retinanet
    head = retinanet_head.RetinaNetHead(
        num_classes,
        anchors_per_cell(r.scales_per_octave, tuple(r.aspect_ratios)),
        m.fpn_width,
        m.head_convs,
        binary=binary_spec(config, "head"),
        dtype=model_dtype(config),
    )
    return _detector(config, head)


def _retinanet_anchors(config, batch) -> np.ndarray:
    return retinanet_head.retinanet_anchors(
        batch["image"].shape[1:3], _strides(config), config.retinanet
    )


def _retinanet_loss(config, outputs, batch):
    r = config.retinanet
    return retinanet_head.retinanet_loss(
        outputs,
        batch,
        anchors=_retinanet_anchors(config, batch),
        num_classes=outputs["cls_logits"].shape[-1],
        positive_iou=r.positive_iou,
        negative_iou=r.negative_iou,
        low_quality_matches=r.low_quality_matches,
        ignore_iof=r.ignore_iof,
        focal_alpha=r.focal_alpha,
        focal_gamma=r.focal_gamma,
        box_loss=r.box_loss,
        smooth_l1_beta=r.smooth_l1_beta,
        box_weights=tuple(r.box_weights),
        chunk_size=r.assign_chunk_size,
    )


def _retinanet_postprocess(config, outputs, batch):
    return retinanet_head.retinanet_postprocess(
        outputs,
        batch["image_hw"],
        anchors=_retinanet_anchors(config, batch),
        box_weights=tuple(config.retinanet.box_weights),
        **_nms_settings(config),
    )


def _validate_retinanet(config) -> None:
    r = config.retinanet
    retinanet_head.check_box_loss(r.box_loss, "config.retinanet.box_loss")
    check_iou_thresholds(r.negative_iou, r.positive_iou, "config.retinanet")
    anchor_shapes(4, r.octave_base_scale, r.scales_per_octave, tuple(r.aspect_ratios))


# Faster R-CNN --------------------------------------------------------------------------------


def _build_faster_rcnn(config: ml_collections.ConfigDict, num_classes: int) -> Detector:
    settings = config.faster_rcnn.to_dict()
    settings["rpn_aspect_ratios"] = tuple(settings["rpn_aspect_ratios"])
    head = faster_rcnn_head.FasterRCNNHead(
        num_classes,
        _strides(config),
        flax.core.FrozenDict(settings),
        config.model.fpn_width,
        binary=binary_spec(config, "head"),
        dtype=model_dtype(config),
    )
    return _detector(config, head)


def _faster_rcnn_loss(config, outputs, batch):
    del batch  # the targets were drawn inside the model (see apply_kwargs)
    return faster_rcnn_head.faster_rcnn_loss(outputs, config.faster_rcnn.smooth_l1_beta)


def _faster_rcnn_postprocess(config, outputs, batch):
    return faster_rcnn_head.faster_rcnn_postprocess(
        outputs, batch["image_hw"], **_nms_settings(config)
    )


def _validate_faster_rcnn(config) -> None:
    f = config.faster_rcnn
    for stage in ("rpn", "roi"):
        names = (f"{stage}_negative_iou", f"{stage}_positive_iou")
        check_iou_thresholds(f[names[0]], f[names[1]], "config.faster_rcnn", names)
    if f.roi_num_samples > f.rpn_post_nms_top_k:
        raise ValueError(
            f"config.faster_rcnn.roi_num_samples={f.roi_num_samples} exceeds the proposals it "
            f"is drawn from (rpn_post_nms_top_k={f.rpn_post_nms_top_k})"
        )
    anchor_shapes(4, f.rpn_octave_base_scale, f.rpn_scales_per_octave, tuple(f.rpn_aspect_ratios))


FAMILIES: dict[str, DetectorFamily] = {
    "fcos": DetectorFamily(_build_fcos, _fcos_loss, _fcos_postprocess, _validate_fcos),
    "retinanet": DetectorFamily(
        _build_retinanet, _retinanet_loss, _retinanet_postprocess, _validate_retinanet
    ),
    "faster_rcnn": DetectorFamily(
        _build_faster_rcnn,
        _faster_rcnn_loss,
        _faster_rcnn_postprocess,
        _validate_faster_rcnn,
        needs_targets=True,
    ),
}


def family(config: ml_collections.ConfigDict) -> DetectorFamily:
    name = config.model.name
    if name not in FAMILIES:
        raise ValueError(f"Unknown config.model.name {name!r}; valid choices: {sorted(FAMILIES)}")
    if name not in config:
        raise ValueError(
            f"config.model.name={name!r} needs a config.{name} section; start from "
            f"configs/{name}_r18.py instead of overriding the model name"
        )
    return FAMILIES[name]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks names and ranges in the config before anything compiles; raises ValueError."""
    family(config)
    model_dtype(config)
    unknown = [p for p in config.model.binary_parts if p not in BINARY_PARTS]
    if unknown:
        raise ValueError(
            f"Unknown config.model.binary_parts {unknown}; valid choices: {list(BINARY_PARTS)}"
        )
    if config.model.binary_parts:
        binary_spec(config, config.model.binary_parts[0])  # validates quantizer and scale names
    if config.dfr.mode not in dfr.MODES:
        raise ValueError(
            f"Unknown config.dfr.mode {config.dfr.mode!r}; valid choices: {list(dfr.MODES)}"
        )
    levels = range(config.model.min_level, config.model.max_level + 1)
    outside = [level for level in config.dfr.levels if level not in levels]
    if outside:
        raise ValueError(f"config.dfr.levels {outside} are not FPN levels {list(levels)}")
    if config.loss.dfr_weight > 0 and not config.dfr.levels:
        raise ValueError("config.loss.dfr_weight > 0 needs config.dfr.levels, e.g. (2, 3, 4)")
    family(config).validate(config)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    validate_config(config)
    return family(config).build(config, num_classes)


def apply_kwargs(config, batch: dict[str, Array], train: bool, rng: Array | None = None) -> dict:
    """Extra keyword arguments of ``model.apply`` for the family: none for dense detectors; for
    two-stage ones the ground truth ('targets') and, in training, the 'sampling' PRNG key."""
    if not family(config).needs_targets:
        return {}
    keys = ("boxes", "labels", "box_valid", "ignore", "image_hw") if train else ("image_hw",)
    kwargs: dict[str, Any] = {"targets": {k: batch[k] for k in keys}}
    if train:
        if rng is None:
            raise ValueError(f"{config.model.name} training needs a PRNG key for its sampling")
        kwargs["rngs"] = {"sampling": rng}
    return kwargs


def detection_loss(config, outputs, batch) -> dict[str, Array]:
    return family(config).loss(config, outputs, batch)


def postprocess(config, outputs, batch):
    return family(config).postprocess(config, outputs, batch)
