"""Building blocks shared by backbone, neck and heads: one conv unit, real, 1-bit or k-bit.

A real unit is conv -> norm -> activation. A 1-bit unit follows Bi-Real Net / ReActNet, as the
DFR-Det paper does (Sec. 4.1, "an extra shortcut and PReLU"):

    x -> [learnable bias] -> BinaryConv -> norm -> (+ shortcut(x)) -> PReLU / RPReLU

with a real shortcut around every binary conv: the identity when shapes match, else (downsampling
or a channel change) avg-pool + real 1x1 conv + norm. A k-bit unit (``BinarySpec.bits`` > 1, the
paper's LSQ baseline) is the same unit with an ``LSQConv`` in place of the ``BinaryConv``, under
the same name, so that both take the same starting weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from dfrdet_jax import layers
from dfrdet_jax.choices import check_choice, unknown_choice

Array = jax.Array

NORMS = ("batch", "group", "none")


@dataclasses.dataclass(frozen=True)
class BinarySpec:
    """How a part of the network is binarized; ``enabled=False`` means real-valued.

    Attributes:
      enabled: use 1-bit (or, with ``bits`` > 1, k-bit) convolutions.
      input_quantizer: activation STE ('approx', 'clipped', 'identity').
      weight_quantizer: weight STE ('clipped', 'identity', 'approx').
      scale: channel-wise alpha: 'learned' (DFR-Det), 'mean' (detached), 'none'.
      pad_value: value of the padding around binarized inputs.
      activation: 'prelu' or 'rprelu' after each binary unit.
      learnable_bias: RSign's learnable threshold before each sign.
      bits: 1 for the binary units above; 2-8 for LSQ k-bit weights and inputs (``LSQConv``),
        which ignore the quantizers, scale and pad_value and keep the rest of the unit.
    """

    enabled: bool = False
    input_quantizer: str = "approx"
    weight_quantizer: str = "clipped"
    scale: str = "learned"
    pad_value: float = 0.0
    activation: str = "prelu"
    learnable_bias: bool = True
    bits: int = 1

    def __post_init__(self):
        if not (isinstance(self.bits, int) and (self.bits == 1 or 2 <= self.bits <= 8)):
            raise ValueError(f"bits must be 1 (binary) or 2-8 (LSQ), got {self.bits!r}")
        layers.get_binary_quantizer(self.input_quantizer)
        layers.get_binary_quantizer(self.weight_quantizer)
        check_choice("scale", self.scale, layers.SCALE_MODES)
        check_choice("binary activation", self.activation, ("prelu", "rprelu"))


REAL = BinarySpec(enabled=False)


def same_size_padding(kernel_size: int) -> list[tuple[int, int]]:
    """torchvision's conv padding, k // 2 on every side of both spatial axes.

    With an odd kernel the output is ceil(n / stride) as with 'SAME', but a stride-2 conv on an
    even-sized map pads (1, 1) where 'SAME' pads (0, 1): only this keeps torchvision's (and so
    ImageNet-pretrained weights') alignment of every strided feature map with the image.
    """
    return [(kernel_size // 2, kernel_size // 2)] * 2


def group_norm(channels: int, dtype: Any, name: str) -> layers.GroupNorm:
    """GroupNorm of ``channels`` channels in 32 groups (fewer for narrow layers)."""
    return layers.GroupNorm(num_groups=math.gcd(32, channels), dtype=dtype, name=name)


def apply_norm(kind: str, x: Array, train: bool, dtype: Any, name: str) -> Array:
    """BatchNorm (running stats in 'batch_stats'), GroupNorm (32 groups, fewer for narrow
    layers), or nothing for 'none'; call inside a compact method."""
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
        )(x)
    if kind == "group":
        return group_norm(x.shape[-1], dtype, name)(x)
    if kind == "none":
        return x
    raise unknown_choice("norm", kind, NORMS)


class ConvUnit(nn.Module):
    """conv (+ norm) (+ activation), real or 1-bit; see the module docstring.

    Attributes:
      features: output channels.
      kernel_size: square kernel size.
      strides: spatial stride.
      binary: how to binarize; real when ``binary.enabled`` is False.
      norm: 'batch', 'group' or 'none'.
      activation: real units only: 'relu' or 'none' (1-bit units use ``binary.activation``).
      shortcut: 1-bit units only: add the Bi-Real shortcut around the binary conv.
      dtype: computation dtype.

    Called with ``level=i``, the unit normalises with that level's own norms ('norm_level{i}',
    'shortcut_norm_level{i}') and shares everything else: a head shared over the pyramid's levels
    with a norm per level, as low-bit detectors do (AQD, arXiv 2007.06919).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    binary: BinarySpec = REAL
    norm: str = "batch"
    activation: str = "relu"
    shortcut: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array | layers.Deferred,
        train: bool,
        level: int | None = None,
        defer_activation: bool = False,
    ) -> Array | layers.Deferred:
        """x: [B, H, W, C] -> [B, ceil(H/strides), ceil(W/strides), features] (odd kernels).

        A 1-bit unit called with ``defer_activation=True`` returns its RPReLU as a
        ``layers.Deferred``, for the next 1-bit unit (which takes one as its ``x``) to compute:
        the same values and gradients, one activation less kept for the backward pass
        (``layers.apply_to_sign``). Real units ignore it.
        """
        norm = "norm" if level is None else f"norm_level{level}"
        k = (self.kernel_size, self.kernel_size)
        pads = same_size_padding(self.kernel_size)
        if not self.binary.enabled:
            y = layers.Conv(
                self.features,
                k,
                self.strides,
                padding=pads,
                use_bias=self.norm == "none",
                dtype=self.dtype,
                kernel_init=nn.initializers.he_normal(),
                name="conv",
            )(layers.computed(x))
            y = apply_norm(self.norm, y, train, self.dtype, norm)
            if self.activation == "relu":
                y = nn.relu(y)
            else:
                check_choice("activation", self.activation, ("relu", "none"))
            return y

        spec = self.binary
        y = layers.LearnableBias(name="bias")(x) if spec.learnable_bias else x
        conv = {"strides": self.strides, "padding": pads, "dtype": self.dtype, "name": "conv"}
        if spec.bits > 1:
            y = layers.LSQConv(self.features, k, bits=spec.bits, **conv)(layers.computed(y))
        else:
            y = layers.BinaryConv(
                self.features,
                k,
                input_quantizer=spec.input_quantizer,
                weight_quantizer=spec.weight_quantizer,
                scale=spec.scale,
                pad_value=spec.pad_value,
                **conv,
            )(y)
        y = apply_norm(self.norm, y, train, self.dtype, norm)
        if self.shortcut:
            y = y + self._shortcut(layers.computed(x), train, f"shortcut_{norm}")
        act = layers.RPReLU(learn_shifts=spec.activation == "rprelu", name="act")
        return act(y, defer=defer_activation)

    def _shortcut(self, x: Array, train: bool, norm: str) -> Array:
        if self.strides == 1 and x.shape[-1] == self.features:
            return x
        if self.strides > 1:
            s = self.strides
            x = nn.avg_pool(x, (s, s), (s, s), padding="SAME", count_include_pad=False)
        x = layers.Conv(
            self.features,
            (1, 1),
            padding="VALID",
            use_bias=self.norm == "none",
            dtype=self.dtype,
            kernel_init=nn.initializers.he_normal(),
            name="shortcut_conv",
        )(x)
        return apply_norm(self.norm, x, train, self.dtype, norm)
