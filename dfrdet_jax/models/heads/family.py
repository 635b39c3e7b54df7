"""Detector families by name: what a family declares next to its head, and the table it
registers into.

Each head module (``fcos``, ``retinanet``, ``faster_rcnn``) ends by registering a
``DetectorFamily``: how its head is built from the config, its loss, its post-processing and the
checks of its own config section. ``models.registry`` imports every head module, so the table is
complete whenever the registry is used; this module imports no head, so there is no cycle. The
config readings every family shares (the FPN strides, the NMS settings) live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from dfrdet_jax.models.common import BinarySpec
from dfrdet_jax.models.detectors import level_strides
from dfrdet_jax.ops import nms

Array = jax.Array
Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class DetectorFamily:
    """What ``models.registry`` calls for a family (``config`` is the whole config).

    Attributes:
      build_head: (config, num_classes, binary, dtype) -> the head module, placed on the FPN
        levels by the registry; binary and dtype are the head's ``BinarySpec`` and computation
        dtype, read from ``config.model``.
      loss: (config, outputs, batch) -> dict of float32 scalars whose 'loss_*' entries sum to
        L_det (the others are reported as metrics).
      postprocess: (config, outputs, batch) -> ``nms.Detections`` with a leading batch axis.
      validate: (config) -> None; raises ValueError for a bad setting of the family's section.
      needs_targets: the model samples from the ground truth (two-stage), so it is applied with
        ``registry.apply_kwargs`` (ground truth and a 'sampling' PRNG key).
      pipeline_targets: (config) -> None, or a picklable function (example) -> example that the
        input pipeline runs on every training example to add targets the step then reads
        instead of computing them (FCOS's and RetinaNet's target assignment, read by the loss;
        the RPN's anchor matching, read by the head through ``registry.apply_kwargs``).
    """

    build_head: Callable[[Config, int, BinarySpec, Any], nn.Module]
    loss: Callable[[Config, dict[str, Array], dict[str, Array]], dict[str, Array]]
    postprocess: Callable[[Config, dict[str, Array], dict[str, Array]], nms.Detections]
    validate: Callable[[Config], None]
    needs_targets: bool = False
    pipeline_targets: Callable[[Config], Callable[[dict], dict] | None] | None = None


# Name (``config.model.name``, and the config section of the family) -> family.
FAMILIES: dict[str, DetectorFamily] = {}


def register(name: str, family: DetectorFamily) -> DetectorFamily:
    """Adds ``family`` under ``name``; KeyError when the name is taken. Returns ``family``."""
    if name in FAMILIES:
        raise KeyError(f"Detector family {name!r} is already registered")
    FAMILIES[name] = family
    return family


def strides(config: Config) -> tuple[int, ...]:
    """Strides px of the FPN levels config.model.min_level..max_level the head runs on."""
    return level_strides(config.model.min_level, config.model.max_level)


def head_width(config: Config) -> int:
    """Channels of the head's conv towers: config.model.head_width, or the FPN width when 0."""
    return config.model.head_width or config.model.fpn_width


def nms_settings(config: Config) -> dict[str, Any]:
    """``config.postprocess`` as the keyword arguments of the heads' post-processing."""
    p = config.postprocess
    return dict(
        score_threshold=p.score_threshold,
        iou_threshold=p.nms_iou_threshold,
        max_detections=p.max_detections,
        pre_nms_top_k=p.pre_nms_top_k,
    )
