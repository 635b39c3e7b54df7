"""The DFR decoder phi (paper, Sec. 3.2): FPN features -> a reconstruction of the input image.

Each chosen level (default P2, P3, P4) is upsampled by a stride-2 transposed convolution and then
bilinearly resized to the common grid of stride ``common_stride`` (4: the P2 grid, H/4 x W/4, as
the paper says); the maps are concatenated along channels, refined by residual blocks
(conv-ReLU-conv + identity), projected linearly (1x1 conv) to 3 * r^2 channels and rearranged by
an r x r pixel shuffle into [B, H, W, 3], with r = common_stride.

Why 3 * r^2 and not the paper's 12: the paper squeezes to 12 channels and applies a 2x pixel
shuffle, which from H/4 gives only H/2 x W/2 x 3 and cannot match the H x W x 3 input it is
compared with. A shuffle by r from stride r is the construction that gives exactly H x W; with
r = 4 that is 48 channels. (Upsampling to H/2 and keeping 12 channels would also be exact, at
four times the decoder's compute.)

The decoder is real-valued and used only in training: detectors call it only when asked for the
reconstruction, so inference never runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def pixel_shuffle(x: Array, r: int) -> Array:
    """[B, h, w, C * r * r] -> [B, h * r, w * r, C], channel index (c, i, j) -> sub-pixel (i, j)."""
    b, h, w, channels = x.shape
    c = channels // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class ResidualBlock(nn.Module):
    width: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype, name="conv1")(x))
        return x + nn.Conv(self.width, (3, 3), dtype=self.dtype, name="conv2")(y)


class DFRDecoder(nn.Module):
    """Attributes:
    width: channels after each transposed conv and in the residual blocks.
    num_blocks: number of residual blocks.
    common_stride: stride of the grid the levels are merged on (4 = P2's grid).
    out_channels: channels of the reconstruction (3 for RGB).
    dtype: computation dtype (the output is float32).
    """

    width: int = 64
    num_blocks: int = 2
    common_stride: int = 4
    out_channels: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, levels: Sequence[Array], image_hw: tuple[int, int]) -> Array:
        """levels: FPN maps [B, h_l, w_l, C]; image_hw: (H, W) of the input -> [B, H, W, 3]."""
        h, w = image_hw
        r = self.common_stride
        if h % r or w % r:
            raise ValueError(f"DFR decoder needs an input size divisible by {r}, got {image_hw}")
        grid = (h // r, w // r)
        merged = []
        for index, x in enumerate(levels):
            x = nn.ConvTranspose(
                self.width, (2, 2), strides=(2, 2), dtype=self.dtype, name=f"deconv{index}"
            )(x)
            x = jax.image.resize(x, (x.shape[0], *grid, x.shape[-1]), method="bilinear")
            merged.append(x)
        x = nn.Conv(self.width, (1, 1), dtype=self.dtype, name="fuse")(jnp.concatenate(merged, -1))
        for index in range(self.num_blocks):
            x = ResidualBlock(self.width, self.dtype, name=f"block{index}")(x)
        x = nn.Conv(self.out_channels * r * r, (1, 1), dtype=self.dtype, name="project")(x)
        return pixel_shuffle(x, r).astype(jnp.float32)
