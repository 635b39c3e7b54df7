"""Pieces shared by the heads: towers and prediction convs (FCOS, RetinaNet, the RPN) and the
top-k + class-wise NMS post-processing (FCOS, RetinaNet, Faster R-CNN's box head).

A tower is a stack of ``ConvUnit``s with GroupNorm, binary in 1-bit variants; prediction convs
always stay real, as the paper keeps "the last layers" real.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrdet_jax.models.common import BinarySpec, ConvUnit
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import nms

Array = jax.Array


def feature_sizes(image_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(h, w) of each level's map for an input of ``image_hw``: ceil(side / stride), as the
    backbone's stride-2 convs with SAME padding give."""
    return [(-(-image_hw[0] // s), -(-image_hw[1] // s)) for s in strides]


def conv_tower(
    prefix: str, num_convs: int, width: int, binary: BinarySpec, dtype: Any
) -> list[ConvUnit]:
    """``num_convs`` 3x3 units named ``{prefix}{i}``; call inside a compact method."""
    return [
        ConvUnit(width, 3, binary=binary, norm="group", dtype=dtype, name=f"{prefix}{i}")
        for i in range(num_convs)
    ]


def prediction_conv(
    features: int, name: str, dtype: Any, prior_prob: float | None = None
) -> nn.Conv:
    """A real 3x3 prediction conv, weights ~ N(0, 0.01); with ``prior_prob`` its bias starts at
    the logit of that probability (the focal-loss classifier initialisation)."""
    bias_init = nn.initializers.zeros
    if prior_prob is not None:
        bias_init = nn.initializers.constant(-math.log((1 - prior_prob) / prior_prob))
    return nn.Conv(
        features,
        (3, 3),
        padding="SAME",
        dtype=dtype,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=bias_init,
        name=name,
    )


def run_tower(tower: list[ConvUnit], x: Array, train: bool) -> Array:
    for unit in tower:
        x = unit(x, train)
    return x


def dense_postprocess(
    scores: Array,
    regression: Array,
    decode: Callable[[Array, Array, Array], Array],
    image_hw: Array,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
) -> nms.Detections:
    """Detections of a batch from dense per-location predictions, static-shape.

    The ``pre_nms_top_k`` best (location, class) pairs of each image are decoded, clipped to the
    image's valid region, and those above ``score_threshold`` go through class-wise NMS.

    Args:
      scores: float [B, P, C] class scores in [0, 1] of every location (point or anchor).
      regression: float [B, P, R] box regression of every location (FCOS ltrb, anchor deltas).
      decode: (locations int [k], their classes int [k], their regression [k, R]) -> boxes
        [k, 4] xyxy px of the padded input.
      image_hw: int [B, 2] valid (h, w) of each image, px.
    Returns:
      ``Detections`` with a leading batch axis, D = max_detections slots per image.
    """
    num_classes = scores.shape[-1]
    k = min(pre_nms_top_k, scores.shape[1] * num_classes)

    def one_image(image_scores, image_regression, hw):
        top_scores, flat_index = jax.lax.top_k(image_scores.reshape(-1), k)
        location, classes = flat_index // num_classes, flat_index % num_classes
        boxes = boxes_ops.clip_boxes(
            decode(location, classes, image_regression[location]),
            hw[0].astype(jnp.float32),
            hw[1].astype(jnp.float32),
        )
        return nms.class_wise_nms(
            boxes,
            top_scores,
            classes,
            jnp.ones((k,), bool),
            iou_threshold=iou_threshold,
            score_threshold=score_threshold,
            max_detections=max_detections,
            pre_nms_top_k=k,
        )

    return jax.vmap(one_image)(scores, regression, image_hw)
