"""Feature Pyramid Network (Lin et al. 2017) with configurable levels, default P2..P6.

Levels up to 5 come from the backbone stages C_l through a lateral 1x1 conv, the top-down path
(nearest 2x upsampling and addition) and a 3x3 output conv. Levels above 5 follow the detector
family's convention (``p6_source``, as mmdetection builds them):

  'p5'       a stride-2 3x3 conv on the FPN's P5 output (FCOS; mmdetection 'on_output'),
  'c5'       a stride-2 3x3 conv on the backbone's C5 (RetinaNet; mmdetection 'on_input'),
  'maxpool'  a stride-2 max pool of kernel 1 of P5, no parameters (Faster R-CNN; mmdetection and
             torchvision's LastLevelMaxPool);

each level above 6 is the same stride-2 step on the level below (a conv on P_{l-1} after a ReLU
for 'p5' and 'c5'; a max pool for 'maxpool'). In 1-bit variants the lateral, output and extra
convs are binary ``ConvUnit``s (with GroupNorm, and a shortcut where shapes allow); with
``defer_outputs`` their output levels are ``layers.Deferred`` activations, for a head of 1-bit
units to compute (one activation less held per level for the backward pass).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrdet_jax import layers
from dfrdet_jax.choices import check_choice
from dfrdet_jax.models.common import REAL, BinarySpec, ConvUnit

Array = jax.Array
P6_SOURCES = ("p5", "c5", "maxpool")


def upsample_nearest_to(x: Array, hw: tuple[int, int]) -> Array:
    """Nearest-neighbour upsampling of [B, h, w, C] to [B, H, W, C] with H <= h * ceil(H / h).

    Each pixel is repeated ceil(H / h) times and the overhang cropped: a level of an odd-sized
    map is ceil(H / 2) (stride-2 3x3 convs padded by 1), so the factor is 2 with one row cut.
    """
    fh, fw = -(-hw[0] // x.shape[1]), -(-hw[1] // x.shape[2])
    return jnp.repeat(jnp.repeat(x, fh, axis=1), fw, axis=2)[:, : hw[0], : hw[1]]


class FPN(nn.Module):
    """FPN over backbone features {'C2'..'C5'} -> {'P{min_level}'..'P{max_level}'}.

    Attributes:
      width: channels of every output level (256 in the paper's detectors).
      min_level: lowest level (2: stride 4), at least 2.
      max_level: highest level (6: stride 64).
      p6_source: how the levels above 5 are built, one of ``P6_SOURCES`` (module docstring).
      binary: binarization of the lateral, output and extra convs.
      dtype: computation dtype.
      defer_outputs: 1-bit output and extra units return their RPReLU as a
        ``layers.Deferred`` (``ConvUnit``); the consumer computes it (``layers.computed``).
    """

    width: int = 256
    min_level: int = 2
    max_level: int = 6
    p6_source: str = "p5"
    binary: BinarySpec = REAL
    dtype: Any = None
    defer_outputs: bool = False

    @nn.compact
    def __call__(
        self, features: dict[str, Array], train: bool
    ) -> dict[str, Array | layers.Deferred]:
        if not 2 <= self.min_level <= 5 or self.max_level < self.min_level:
            raise ValueError(
                f"FPN levels must satisfy 2 <= min_level <= 5 and max_level >= min_level, "
                f"got {self.min_level}..{self.max_level}"
            )
        check_choice("FPN p6_source", self.p6_source, P6_SOURCES)
        norm = "group" if self.binary.enabled else "none"
        unit = dict(binary=self.binary, norm=norm, activation="none", dtype=self.dtype)
        top = min(self.max_level, 5)
        laterals = {
            level: ConvUnit(self.width, 1, shortcut=False, name=f"lateral{level}", **unit)(
                features[f"C{level}"], train
            )
            for level in range(self.min_level, top + 1)
        }
        merged = {top: laterals[top]}
        for level in range(top - 1, self.min_level - 1, -1):
            merged[level] = laterals[level] + upsample_nearest_to(
                merged[level + 1], laterals[level].shape[1:3]
            )
        outputs = {
            f"P{level}": ConvUnit(self.width, 3, name=f"output{level}", **unit)(
                merged[level], train, defer_activation=self.defer_outputs
            )
            for level in range(self.min_level, top + 1)
        }
        for level in range(top + 1, self.max_level + 1):
            below = outputs[f"P{level - 1}"]
            if self.p6_source == "maxpool":
                # A max pool of kernel 1 and stride 2 keeps every second pixel: ceil(h / 2) rows.
                outputs[f"P{level}"] = layers.computed(below)[:, ::2, ::2]
                continue
            if level == 6 and self.p6_source == "c5":
                source = features["C5"]
            elif level > 6 and not self.binary.enabled:
                source = nn.relu(below)  # as FCOS/RetinaNet: ReLU between the extra stride-2 convs
            else:
                source = below
            outputs[f"P{level}"] = ConvUnit(self.width, 3, 2, name=f"extra{level}", **unit)(
                source, train, defer_activation=self.defer_outputs
            )
        return outputs
