"""What the single-stage heads share: feature-map sizes, conv towers and prediction convs, the
two-tower body of FCOS and RetinaNet (``tower_head``), and the top-k + class-wise NMS
post-processing of per-location scores (FCOS, RetinaNet, and Faster R-CNN's box head on its
proposals), and the targets the input pipeline may assign for them (``PipelineTargets``). The
RPN builds its one-conv tower from the same pieces.

A tower is a stack of ``ConvUnit``s with GroupNorm, binary in 1-bit variants; prediction convs
always stay real, as the paper keeps "the last layers" real.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrdet_jax import layers
from dfrdet_jax.models.common import BinarySpec, ConvUnit, group_norm
from dfrdet_jax.models.heads import family
from dfrdet_jax.ops import boxes as boxes_ops
from dfrdet_jax.ops import host_targets, nms

Array = jax.Array
# Initial foreground probability of a focal-loss classifier (Lin et al. 2017).
PRIOR_PROB = 0.01
# The batch entry of the pipeline's assignment: int32 [B, L], a box slot per location (anchor or
# point), or host_targets.BACKGROUND / IGNORED.
MATCHED_SLOT = "matched_slot"


class PipelineTargets:
    """A head's target assignment run in the input pipeline: adds ``MATCHED_SLOT`` int32 [L]
    to a standard training example, from its boxes, validity and ignore flags, by ``assign``
    (an ``ops.host_targets`` assigner for the configured image size). Picklable, for the
    pipeline's worker processes."""

    def __init__(self, assign: Callable[..., Any]):
        self.assign = assign

    def __call__(self, example: dict) -> dict:
        slots = self.assign(example["boxes"], example["box_valid"], example["ignore"])
        return {**example, MATCHED_SLOT: slots}


def input_size_targets(config, assigner: Callable[..., Any], **settings) -> PipelineTargets:
    """``PipelineTargets`` of ``assigner`` (an ``ops.host_targets`` class, built from the
    feature-map sizes and strides of a config.data.image_size square input, and ``settings``)."""
    size = config.data.image_size
    strides = family.strides(config)
    return PipelineTargets(assigner(feature_sizes((size, size), strides), strides, **settings))


def pipeline_ground_truth(batch: Mapping[str, Array], num_locations: int, num_classes: int):
    """Each location's ground truth from the pipeline's assignment batch[MATCHED_SLOT] [B, L]
    (two gathers from the batch's boxes and labels instead of assigning in the step), or None
    when the batch has none. Returns dict of 'positive' bool [B, L], 'labels' int32 [B, L]
    (``num_classes`` unless positive), 'boxes' float32 [B, L, 4] xyxy px (the assigned box;
    slot 0's where not positive) and 'ignore' bool [B, L]. ValueError when L is not
    ``num_locations`` (the pipeline assigned another image size or anchor setting)."""
    if MATCHED_SLOT not in batch:
        return None
    slots = batch[MATCHED_SLOT]
    if slots.shape[1] != num_locations:
        raise ValueError(
            f"batch[{MATCHED_SLOT!r}] holds {slots.shape[1]} locations, the head "
            f"{num_locations}: the pipeline assigned another image size or anchor setting"
        )
    positive = slots >= 0
    slot = jnp.maximum(slots, 0)
    labels = jnp.take_along_axis(batch["labels"], slot, axis=1)
    return {
        "positive": positive,
        "labels": jnp.where(positive, labels, num_classes).astype(jnp.int32),
        "boxes": jnp.take_along_axis(batch["boxes"].astype(jnp.float32), slot[..., None], axis=1),
        "ignore": slots == host_targets.IGNORED,
    }


def feature_sizes(image_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(h, w) of each level's map for an input of ``image_hw``: ceil(side / stride), as the
    backbone's stride-2 3x3 convs (padded by 1) give."""
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
) -> layers.Conv:
    """A real 3x3 prediction conv, weights ~ N(0, 0.01); with ``prior_prob`` its bias starts at
    the logit of that probability (the focal-loss classifier initialisation)."""
    bias_init = nn.initializers.zeros
    if prior_prob is not None:
        bias_init = nn.initializers.constant(-math.log((1 - prior_prob) / prior_prob))
    return layers.Conv(
        features,
        (3, 3),
        padding="SAME",
        dtype=dtype,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=bias_init,
        name=name,
    )


def run_tower(tower: list[ConvUnit], x: Array, train: bool, level: int | None = None) -> Array:
    """x [B, h, w, C] through the units of ``tower`` in order; with ``level``, each unit
    normalises with that level's own norms (``ConvUnit``). 1-bit units hand their activation
    on deferred (``ConvUnit``); the last one's output is computed."""
    for i, unit in enumerate(tower):
        x = unit(x, train, level, defer_activation=i < len(tower) - 1)
    return x


def takes_deferred_levels(binary: BinarySpec, input_norm: bool) -> bool:
    """Whether ``tower_head`` can take the FPN's levels as ``layers.Deferred`` activations:
    its first units are 1-bit (they compute the activation inside their binary convs and
    recompute it in the backward pass) and no GroupNorm comes before them."""
    return binary.enabled and not input_norm


def normalized_levels(levels: Sequence[Array], dtype: Any) -> list[Array]:
    """Each [B, h_l, w_l, C] level through one GroupNorm ('input_norm') shared by the levels;
    call inside a compact method. A 1-bit unit adds its binary branch, normalised to about
    unit scale, to its input, so a real FPN's outputs (RMS about 14 at the demo budget) would
    drown the first unit's branch (RESULTS.md, "A 1-bit head on a real FPN")."""
    normalize = group_norm(levels[0].shape[-1], dtype, "input_norm")
    return [normalize(x) for x in levels]


def tower_head(
    levels: Sequence[Array],
    train: bool,
    *,
    num_classes: int,
    num_anchors: int,
    box_outputs: Mapping[str, int],
    width: int,
    num_convs: int,
    prior_prob: float,
    binary: BinarySpec,
    dtype: Any,
    input_norm: bool = False,
    level_norms: bool = False,
) -> dict[str, list[Array]]:
    """The body of FCOS and RetinaNet, shared over the levels; call inside a compact method (its
    submodules are named in the caller's scope).

    A classification tower ``cls_tower{i}`` and a regression tower ``reg_tower{i}`` of
    ``num_convs`` units each; on the first the prediction conv 'cls_logits' (K * num_classes
    channels, bias at ``prior_prob``), on the second one prediction conv per ``box_outputs``
    entry (its name -> D, K * D channels), K = ``num_anchors`` per location.

    With ``input_norm``, the levels first go through ``normalized_levels``. With
    ``level_norms``, the towers' units keep a norm per level (the i-th level given:
    'norm_level{i}'), their convs shared.

    Args:
      levels: one [B, h_l, w_l, C_in] map per level (or ``layers.Deferred``, when
        ``takes_deferred_levels``).
    Returns:
      {'cls_logits': per level [B, h_l * w_l * K, num_classes], and for every box output
      name: per level [B, h_l * w_l * K, D]}, in the computation dtype; rows are row-major over
      the cells, the K predictions of a cell last.
    """
    cls_tower = conv_tower("cls_tower", num_convs, width, binary, dtype)
    reg_tower = conv_tower("reg_tower", num_convs, width, binary, dtype)
    cls_out = prediction_conv(num_anchors * num_classes, "cls_logits", dtype, prior_prob)
    box_out = {
        name: prediction_conv(num_anchors * depth, name, dtype)
        for name, depth in box_outputs.items()
    }
    outputs = {"cls_logits": [], **{name: [] for name in box_outputs}}
    if input_norm:
        levels = normalized_levels(levels, dtype)
    for i, x in enumerate(levels):
        batch, level = x.shape[0], i if level_norms else None
        c = run_tower(cls_tower, x, train, level)
        r = run_tower(reg_tower, x, train, level)
        outputs["cls_logits"].append(cls_out(c).reshape(batch, -1, num_classes))
        for name, depth in box_outputs.items():
            outputs[name].append(box_out[name](r).reshape(batch, -1, depth))
    return outputs


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
    threshold_scores: Array | None = None,
) -> nms.Detections:
    """Detections of a batch from dense per-location predictions, static-shape.

    The (location, class) pairs whose ``threshold_scores`` exceed ``score_threshold`` are the
    candidates; the ``pre_nms_top_k`` best candidates of each image by ``scores`` are decoded,
    clipped to the image's valid region, and go through class-wise NMS, which ranks and reports
    them by ``scores``.

    Args:
      scores: float [B, P, C] class scores in [0, 1] of every location (point or anchor).
      regression: float [B, P, R] box regression of every location (FCOS ltrb, anchor deltas).
      decode: (locations int [k], their classes int [k], their regression [k, R]) -> boxes
        [k, 4] xyxy px of the padded input.
      image_hw: int [B, 2] valid (h, w) of each image, px.
      threshold_scores: float [B, P, C], the scores ``score_threshold`` applies to where they
        differ from ``scores`` (mmdetection's FCOS thresholds the class score and then scores by
        class score x centerness); None: ``scores`` themselves.
    Returns:
      ``Detections`` with a leading batch axis, D = max_detections slots per image.
    """
    num_classes = scores.shape[-1]
    k = min(pre_nms_top_k, scores.shape[1] * num_classes)
    if threshold_scores is None:
        threshold_scores = scores
    if threshold_scores.shape != scores.shape:
        raise ValueError(
            f"threshold_scores {threshold_scores.shape} must have the shape of scores "
            f"{scores.shape}"
        )

    def one_image(image_scores, image_threshold_scores, image_regression, hw):
        candidate = (image_threshold_scores > score_threshold).reshape(-1)
        # Non-candidates rank last (-inf) and enter NMS as invalid: a static-shape top-k of the
        # candidates only.
        ranked = jnp.where(candidate, image_scores.reshape(-1), -jnp.inf)
        _, flat_index = jax.lax.top_k(ranked, k)
        top_scores = image_scores.reshape(-1)[flat_index]
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
            candidate[flat_index],
            iou_threshold=iou_threshold,
            score_threshold=-jnp.inf,  # the threshold is applied above, to threshold_scores
            max_detections=max_detections,
            pre_nms_top_k=k,
        )

    return jax.vmap(one_image)(scores, threshold_scores, regression, image_hw)
