"""Detectors by family name: the registry every caller goes through.

Training and evaluation call ``validate_config``, ``build_model``, ``apply_kwargs``,
``detection_loss`` and ``postprocess``. Each family (``heads.fcos``, ``heads.retinanet``,
``heads.faster_rcnn``) declares next to its head how it is built from the config, its loss, its
post-processing and its own checks, and registers itself in ``heads.family``; this module
imports those head modules so that the table is complete, puts the shared backbone, neck and DFR
decoder around the head, and holds the checks of the sections every family shares. A new family
is a head module that registers a ``heads.family.DetectorFamily`` and is imported here, instead
of ``if name == ...`` branches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dfrdet_jax.choices import check_choice, unknown_choice
from dfrdet_jax.losses import dfr
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.detectors import Detector
from dfrdet_jax.models.fpn import P6_SOURCES
from dfrdet_jax.models.heads import faster_rcnn, fcos, retinanet  # noqa: F401  (registers them)
from dfrdet_jax.models.heads.family import FAMILIES, DetectorFamily
from dfrdet_jax.models.heads.single_stage import MATCHED_SLOT

Array = jax.Array
BINARY_PARTS = ("backbone", "neck", "head")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def binary_spec(config: ml_collections.ConfigDict, part: str) -> BinarySpec:
    """The BinarySpec of ``part`` ('backbone', 'neck' or 'head') from ``config.model``."""
    if part not in config.model.binary_parts:
        return REAL
    return BinarySpec(enabled=True, **config.model.binary.to_dict())


def head_drowned_by_real_levels(config: ml_collections.ConfigDict) -> bool:
    """Whether a quantized head reads a real FPN's levels unnormalised: their scale (RMS about
    14 at the demo budget) drowns the branch its first units add (RESULTS.md, "A 1-bit head on a
    real FPN"; ``config.model.head_input_norm`` removes it: +4.9 AP for the 1-bit FCOS, 6 seeds)."""
    parts = config.model.binary_parts
    return "head" in parts and "neck" not in parts and not config.model.head_input_norm


def model_dtype(config: ml_collections.ConfigDict):
    """The computation dtype of ``config.model.dtype`` ('float32' or 'bfloat16')."""
    try:
        return DTYPES[config.model.dtype]
    except KeyError:
        raise unknown_choice("config.model.dtype", config.model.dtype, sorted(DTYPES)) from None


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
        p6_source=m.p6_source,
        backbone_binary=binary_spec(config, "backbone"),
        neck_binary=binary_spec(config, "neck"),
        decoder_levels=tuple(config.dfr.levels),
        decoder_width=config.dfr.decoder_width,
        decoder_blocks=config.dfr.decoder_blocks,
        dtype=model_dtype(config),
    )


def family(config: ml_collections.ConfigDict) -> DetectorFamily:
    """The registered family of ``config.model.name``; ValueError naming the known ones."""
    name = config.model.name
    check_choice("config.model.name", name, sorted(FAMILIES))
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
    if unknown:  # every unknown entry at once, not the first
        raise unknown_choice("config.model.binary_parts entries", unknown, BINARY_PARTS)
    if config.model.binary_parts:
        binary_spec(config, config.model.binary_parts[0])  # validates quantizer and scale names
    if config.model.head_width < 0:
        raise ValueError(
            "config.model.head_width must be >= 0 (0: the FPN width), "
            f"got {config.model.head_width}"
        )
    check_choice("config.model.p6_source", config.model.p6_source, P6_SOURCES)
    check_choice("config.dfr.mode", config.dfr.mode, dfr.MODES)
    check_on_fpn_levels("config.dfr.levels", config.dfr.levels, config)
    if config.loss.dfr_weight > 0 and not config.dfr.levels:
        raise ValueError("config.loss.dfr_weight > 0 needs config.dfr.levels, e.g. (2, 3, 4)")
    family(config).validate(config)


def fpn_levels(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The pyramid's levels, ``model.min_level`` to ``model.max_level`` (P2-P6 by default)."""
    return tuple(range(config.model.min_level, config.model.max_level + 1))


def check_on_fpn_levels(setting: str, chosen, config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming ``setting`` and every level of ``chosen`` the FPN lacks."""
    pyramid = fpn_levels(config)
    outside = [level for level in chosen if level not in pyramid]
    if outside:
        raise ValueError(f"{setting} {outside} are not FPN levels {list(pyramid)}")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Detector:
    """The validated ``Detector`` of ``config`` with ``num_classes`` foreground classes."""
    validate_config(config)
    head = family(config).build_head(
        config, num_classes, binary_spec(config, "head"), model_dtype(config)
    )
    return _detector(config, head)


def apply_kwargs(config, batch: dict[str, Array], train: bool, rng: Array | None = None) -> dict:
    """Extra keyword arguments of ``model.apply`` for the family: none for dense detectors; for
    two-stage ones the ground truth ('targets') and, in training, the 'sampling' PRNG key."""
    if not family(config).needs_targets:
        return {}
    keys = ("boxes", "labels", "box_valid", "ignore", "image_hw") if train else ("image_hw",)
    if train and MATCHED_SLOT in batch:  # the RPN's anchors, matched in the input pipeline
        keys += (MATCHED_SLOT,)
    kwargs: dict[str, Any] = {"targets": {k: batch[k] for k in keys}}
    if train:
        if rng is None:
            raise ValueError(f"{config.model.name} training needs a PRNG key for its sampling")
        kwargs["rngs"] = {"sampling": rng}
    return kwargs


def pipeline_targets(config: ml_collections.ConfigDict):
    """None, or the function the training input pipeline runs on each example to add the
    family's targets (``DetectorFamily.pipeline_targets``); pass it to ``data.build_dataset``."""
    make = family(config).pipeline_targets
    return make(config) if make is not None else None


def detection_loss(config, outputs, batch) -> dict[str, Array]:
    """L_det of the family: a dict of float32 scalars, the 'loss_*' entries summing to L_det."""
    return family(config).loss(config, outputs, batch)


def postprocess(config, outputs, batch):
    """Detections (``ops.nms.Detections`` with a leading batch axis) of inference outputs."""
    return family(config).postprocess(config, outputs, batch)
