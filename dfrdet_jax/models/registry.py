"""Detector families by name: how to build each from a config, its loss and its post-processing.

Training and evaluation code calls only ``build_model``, ``detection_loss`` and ``postprocess``;
a new family registers a ``DetectorFamily`` here instead of adding ``if name == ...`` branches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfrdet_jax.losses import dfr
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.detectors import FCOS
from dfrdet_jax.models.heads import fcos as fcos_head

Array = jax.Array
BINARY_PARTS = ("backbone", "neck", "head")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DetectorFamily:
    """build(config, num_classes) -> module; loss(config, outputs, batch) -> dict of scalars whose
    'loss_*' entries sum to L_det (others are reported as metrics); postprocess(config, outputs,
    batch) -> ``dfrdet_jax.ops.nms.Detections`` with a leading batch axis."""

    build: Callable[[ml_collections.ConfigDict, int], Any]
    loss: Callable[..., dict[str, Array]]
    postprocess: Callable[..., Any]


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


def _build_fcos(config: ml_collections.ConfigDict, num_classes: int) -> FCOS:
    m = config.model
    return FCOS(
        num_classes=num_classes,
        depth=m.depth,
        backbone_width=m.backbone_width,
        fpn_width=m.fpn_width,
        min_level=m.min_level,
        max_level=m.max_level,
        head_convs=m.head_convs,
        backbone_binary=binary_spec(config, "backbone"),
        neck_binary=binary_spec(config, "neck"),
        head_binary=binary_spec(config, "head"),
        decoder_levels=tuple(config.dfr.levels),
        decoder_width=config.dfr.decoder_width,
        decoder_blocks=config.dfr.decoder_blocks,
        dtype=model_dtype(config),
    )


def _fcos_strides(config) -> tuple[int, ...]:
    return tuple(2**level for level in range(config.model.min_level, config.model.max_level + 1))


def _fcos_loss(config, outputs, batch):
    f = config.fcos
    return fcos_head.fcos_loss(
        outputs,
        batch,
        strides=_fcos_strides(config),
        regress_ranges=np.asarray(f.regress_ranges),
        num_classes=outputs["cls_logits"].shape[-1],
        center_sampling=f.center_sampling,
        center_radius=f.center_radius,
        focal_alpha=f.focal_alpha,
        focal_gamma=f.focal_gamma,
        chunk_size=f.assign_chunk_size,
    )


def _fcos_postprocess(config, outputs, batch):
    f = config.fcos
    return fcos_head.fcos_postprocess(
        outputs,
        batch["image_hw"],
        input_hw=batch["image"].shape[1:3],
        strides=_fcos_strides(config),
        score_threshold=f.score_threshold,
        iou_threshold=f.nms_iou_threshold,
        max_detections=f.max_detections,
        pre_nms_top_k=f.pre_nms_top_k,
    )


FAMILIES: dict[str, DetectorFamily] = {
    "fcos": DetectorFamily(_build_fcos, _fcos_loss, _fcos_postprocess),
}


def family(config: ml_collections.ConfigDict) -> DetectorFamily:
    name = config.model.name
    if name not in FAMILIES:
        raise ValueError(f"Unknown config.model.name {name!r}; valid choices: {sorted(FAMILIES)}")
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
    if config.model.name == "fcos" and len(config.fcos.regress_ranges) != len(levels):
        raise ValueError(
            f"config.fcos.regress_ranges has {len(config.fcos.regress_ranges)} ranges "
            f"for {len(levels)} FPN levels"
        )


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    validate_config(config)
    return family(config).build(config, num_classes)


def detection_loss(config, outputs, batch) -> dict[str, Array]:
    return family(config).loss(config, outputs, batch)


def postprocess(config, outputs, batch):
    return family(config).postprocess(config, outputs, batch)
