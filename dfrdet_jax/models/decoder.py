"""The DFR decoder phi (paper, Sec. 3.2): FPN features -> a reconstruction of the input image.

Each chosen level (default P2, P3, P4) is upsampled by a stride-2 transposed convolution and then
bilinearly resized to the stride-4 grid (P2's: ceil(H/4) x ceil(W/4), the paper's C x W/4 x H/4);
the maps are concatenated along channels, refined by residual blocks (conv-ReLU-conv +
identity), projected linearly (1x1 conv) to 3 * 4^2 channels and rearranged by a 4 x 4 pixel
shuffle into [B, H, W, 3] (the rows and columns past H and W cropped).

The grid is the stride-4 one whatever the levels: the paper merges every level there, so every
row of its Table 1 ({P5} or {P6} alone too) builds the same output stage and trains at any input
size. (On the grid of the finest chosen level instead, {P5} alone would need a 32 x 32 shuffle to
3,072 channels, and {P6} alone sides divisible by 64, which AI-TOD's 800 px are not.)

Why 3 * 4^2 and not the paper's 12: the paper squeezes to 12 channels and applies a 2x pixel
shuffle, which from H/4 gives only H/2 x W/2 x 3 and cannot match the H x W x 3 input it is
compared with. A shuffle by 4 from stride 4 is the construction that gives exactly H x W: 48
channels. (Upsampling to H/2 and keeping 12 channels would also be exact, at four times the
decoder's compute.)

The decoder is real-valued and used only in training: detectors call it only when asked for the
reconstruction, so inference never runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from dfrdet_jax import layers

Array = jax.Array
MERGE_STRIDE = 4  # the grid every level is merged on: P2's


def pixel_shuffle(x: Array, r: int) -> Array:
    """[B, h, w, C * r * r] -> [B, h * r, w * r, C], channel index (c, i, j) -> sub-pixel (i, j)."""
    b, h, w, channels = x.shape
    c = channels // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class Deconv2x(nn.Module):
    """The 2x2 transposed convolution of stride 2: ``nn.ConvTranspose(features, (2, 2),
    strides=(2, 2))`` with the same parameters, initialisation and output, computed as one
    matmul and a depth-to-space rearrangement.

    Its 2x2 windows do not overlap, so output pixel (2i + a, 2j + b) is input pixel (i, j) times
    the kernel tap (1 - a, 1 - b) (flax's transposed convolution does not flip the kernel, and
    its 'SAME' padding puts tap 1 on the even rows). Why not ``nn.ConvTranspose`` itself: XLA:CPU
    computes its gradient as a dilated convolution in a slow generic path: at 512 px and batch 2
    on one core, 17.7 s for P2's and 3.6 s for P3's, whose forward pass takes 8 ms. As a matmul
    the whole decoder's forward and backward take 0.9 s there.
    """

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, h, w, C] -> [B, 2h, 2w, features]."""
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (2, 2, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        taps = kernel[::-1, ::-1].transpose(2, 3, 0, 1)  # [C, features, 2, 2]: channel (o, a, b)
        return pixel_shuffle(x @ taps.reshape(x.shape[-1], -1), 2) + bias


class ResidualBlock(nn.Module):
    width: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.relu(layers.Conv(self.width, (3, 3), dtype=self.dtype, name="conv1")(x))
        return x + layers.Conv(self.width, (3, 3), dtype=self.dtype, name="conv2")(y)


class DFRDecoder(nn.Module):
    """Attributes:
    width: channels after each transposed conv and in the residual blocks.
    num_blocks: number of residual blocks.
    out_channels: channels of the reconstruction (3 for RGB).
    dtype: computation dtype (the output is float32).
    """

    width: int = 64
    num_blocks: int = 2
    out_channels: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, levels: Sequence[Array], image_hw: tuple[int, int]) -> Array:
        """levels: FPN maps [B, h_l, w_l, C], any of P2-P6 in any number; image_hw: (H, W) of the
        input, any size -> [B, H, W, 3]."""
        h, w = image_hw
        r = MERGE_STRIDE
        grid = (-(-h // r), -(-w // r))
        merged = []
        for index, x in enumerate(levels):
            x = Deconv2x(self.width, dtype=self.dtype, name=f"deconv{index}")(x)
            x = jax.image.resize(x, (x.shape[0], *grid, x.shape[-1]), method="bilinear")
            merged.append(x)
        x = layers.Conv(self.width, (1, 1), dtype=self.dtype, name="fuse")(
            jnp.concatenate(merged, -1)
        )
        for index in range(self.num_blocks):
            x = ResidualBlock(self.width, self.dtype, name=f"block{index}")(x)
        x = layers.Conv(self.out_channels * r * r, (1, 1), dtype=self.dtype, name="project")(x)
        return pixel_shuffle(x, r)[:, :h, :w].astype(jnp.float32)
