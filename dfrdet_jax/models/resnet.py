"""ResNet-18/34 backbones (NHWC), real-valued or 1-bit in the Bi-Real / ReActNet style.

Real: the standard ResNet (He et al. 2016) with BasicBlocks; ResNet-18 has 11,176,512 parameters
without its classifier. 1-bit (as the DFR-Det paper, Sec. 4.1): every 3x3 conv of the stages is a
binary ``ConvUnit`` with its own shortcut and PReLU; the stem conv and the downsampling shortcuts
(avg-pool + real 1x1 conv + BN) stay real.

Outputs the stage features {'C2': stride 4, 'C3': 8, 'C4': 16, 'C5': 32}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from dfrdet_jax import layers
from dfrdet_jax.choices import check_choice
from dfrdet_jax.models.common import REAL, BinarySpec, ConvUnit, apply_norm

Array = jax.Array

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Real: conv-BN-ReLU-conv-BN + shortcut, ReLU. 1-bit: two Bi-Real units, each with its own
    shortcut."""

    features: int
    strides: int
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.binary.enabled:
            x = ConvUnit(
                self.features, 3, self.strides, self.binary, dtype=self.dtype, name="unit1"
            )(x, train, defer_activation=True)
            return ConvUnit(self.features, 3, 1, self.binary, dtype=self.dtype, name="unit2")(
                x, train
            )
        y = ConvUnit(self.features, 3, self.strides, dtype=self.dtype, name="unit1")(x, train)
        y = ConvUnit(self.features, 3, 1, activation="none", dtype=self.dtype, name="unit2")(
            y, train
        )
        if self.strides != 1 or x.shape[-1] != self.features:
            x = layers.Conv(
                self.features,
                (1, 1),
                self.strides,
                padding="VALID",
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.initializers.he_normal(),
                name="shortcut_conv",
            )(x)
            x = apply_norm("batch", x, train, self.dtype, "shortcut_norm")
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet backbone returning C2..C5.

    Attributes:
      depth: 18 or 34.
      width: channels of the first stage (64 in the standard network; smaller in tests).
      binary: binarization of the stage convs (the stem always stays real).
      dtype: computation dtype.
    """

    depth: int = 18
    width: int = 64
    binary: BinarySpec = REAL
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> dict[str, Array]:
        """x: [B, H, W, 3] normalised image -> {'C2': [B, ceil(H/4), ceil(W/4), width], ...,
        'C5': stride 32}."""
        check_choice("ResNet depth", self.depth, sorted(STAGE_BLOCKS))
        x = layers.Conv(
            self.width,
            (7, 7),
            2,
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.he_normal(),
            name="stem_conv",
        )(x)
        x = nn.relu(apply_norm("batch", x, train, self.dtype, "stem_norm"))
        x = layers.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        features = {}
        for stage, num_blocks in enumerate(STAGE_BLOCKS[self.depth]):
            channels = self.width * 2**stage
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    channels,
                    strides,
                    self.binary,
                    self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train)
            features[f"C{stage + 2}"] = x
        return features
