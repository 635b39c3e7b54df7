"""Detectors = backbone + neck + head (+ the training-only DFR decoder).

``Detector`` maps normalised images to its head's predictions (``FCOSHead``: per point,
``RetinaNetHead``: per anchor, ``FasterRCNNHead``: per anchor and per RoI); ``models.registry``
builds it for each family. When built with
decoder levels and called with ``reconstruct=True`` it also returns the DFR reconstruction of the
input; inference calls it with ``reconstruct=False``, so the decoder never runs there (its
parameters can even be dropped from the checkpoint used for deployment).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrdet_jax import layers
from dfrdet_jax.models.common import REAL, BinarySpec
from dfrdet_jax.models.decoder import DFRDecoder
from dfrdet_jax.models.fpn import FPN
from dfrdet_jax.models.resnet import ResNet

Array = jax.Array

# ImageNet statistics in 0-255 pixel units (RGB).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# The parameter (and module) names of the FPN and of the training-only DFR decoder: the
# optimizer gives the decoder its own learning rate by this name.
NECK, DECODER = "neck", "decoder"


def normalize_images(images: Array, dtype: Any = jnp.float32) -> Array:
    """uint8 [B, H, W, 3] -> (x - mean) / std in ``dtype``; the DFR loss compares against this."""
    x = images.astype(jnp.float32)
    return ((x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)).astype(dtype)


class Detector(nn.Module):
    """ResNet + FPN + a head (FCOS, RetinaNet, Faster R-CNN), real or 1-bit, with an optional DFR
    decoder.

    Attributes:
      head: the head module, called as ``head(levels, train)`` (``head(levels, train, targets)``
        when targets are given) on the FPN levels [P{min_level}, ..., P{max_level}] and returning
        a dict of outputs (its parameters live under 'head').
      depth: ResNet depth (18 or 34).
      backbone_width: first-stage channels (64 standard).
      fpn_width: FPN channels (256 standard).
      min_level, max_level: FPN levels used for detection (2..6: strides 4..64).
      p6_source: how the FPN builds the levels above 5 ('p5', 'c5' or 'maxpool'; see
        ``models.fpn``).
      backbone_binary, neck_binary: binarization of each part (the head carries its own).
      decoder_levels: FPN levels fed to the DFR decoder, e.g. (2, 3, 4); empty: no decoder.
      decoder_width, decoder_blocks: DFR decoder size.
      dtype: computation dtype (parameters stay float32).
    """

    head: nn.Module
    depth: int = 18
    backbone_width: int = 64
    fpn_width: int = 256
    min_level: int = 2
    max_level: int = 6
    p6_source: str = "p5"
    backbone_binary: BinarySpec = REAL
    neck_binary: BinarySpec = REAL
    decoder_levels: Sequence[int] = ()
    decoder_width: int = 64
    decoder_blocks: int = 2
    dtype: Any = None

    @property
    def strides(self) -> tuple[int, ...]:
        return level_strides(self.min_level, self.max_level)

    @nn.compact
    def __call__(
        self,
        images: Array,
        train: bool,
        reconstruct: bool = False,
        targets: dict[str, Array] | None = None,
        features: bool = False,
        run_head: bool = True,
    ) -> dict[str, Array]:
        """images: normalised [B, H, W, 3] of any size; level l is ceil(H / 2^l) x ceil(W / 2^l)
        (stride-2 3x3 convs padded by 1), so e.g. AI-TOD's 800 px need no padding to 832.
        targets: ground truth for heads that sample from it (Faster R-CNN; see
        ``registry.apply_kwargs``), passed on to the head when given.
        features: also return the FPN maps (for distillation).
        run_head: False skips the head (a teacher whose logits are not needed).

        Returns the head outputs and, with ``reconstruct``, 'reconstruction' [B, H, W, 3] float32;
        with ``features``, 'features': the maps [P{min_level}, ..., P{max_level}], each
        [B, h_l, w_l, fpn_width].
        """
        stages = ResNet(
            self.depth, self.backbone_width, self.backbone_binary, self.dtype, name="backbone"
        )(images, train)
        pyramid = FPN(
            self.fpn_width,
            self.min_level,
            self.max_level,
            self.p6_source,
            self.neck_binary,
            self.dtype,
            # A head of 1-bit towers computes the FPN's output activations itself: one
            # activation less held per level (benchmarks/README.md, memory).
            defer_outputs=getattr(self.head, "takes_deferred_levels", False),
            name=NECK,
        )(stages, train)
        levels = [pyramid[f"P{level}"] for level in range(self.min_level, self.max_level + 1)]
        outputs = {}
        if run_head:
            outputs = (
                self.head(levels, train) if targets is None else self.head(levels, train, targets)
            )
        if features:
            outputs["features"] = [layers.computed(x) for x in levels]
        if reconstruct:
            if not self.decoder_levels:
                raise ValueError("reconstruct=True needs decoder_levels, e.g. (2, 3, 4)")
            missing = [v for v in self.decoder_levels if not self.min_level <= v <= self.max_level]
            if missing:
                raise ValueError(
                    f"decoder levels {missing} are outside the FPN levels "
                    f"{self.min_level}..{self.max_level}"
                )
            outputs["reconstruction"] = DFRDecoder(
                self.decoder_width, self.decoder_blocks, dtype=self.dtype, name=DECODER
            )([layers.computed(pyramid[f"P{v}"]) for v in self.decoder_levels], images.shape[1:3])
        return outputs


def level_strides(min_level: int, max_level: int) -> tuple[int, ...]:
    """Strides 2^l px of the FPN levels min_level..max_level."""
    return tuple(2**level for level in range(min_level, max_level + 1))
