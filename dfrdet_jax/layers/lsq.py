"""k-bit convolution and dense layers with learned step sizes (LSQ, Esser et al., ICLR 2020).

Both layers compute, for input activations ``a`` and real weights ``w``:

    out = q(a; s_a) (*) q(w; s_w)

where ``q(v; s) = round(clip(v / s, q_min, q_max)) * s`` is ``quantizers.lsq_quantize`` (signed,
q in [-2^(k-1), 2^(k-1) - 1], e.g. [-8, 7] for k = 4), ``s_w`` a learned per-output-channel step
(``weight_step`` [c_out]) and ``s_a`` a learned scalar step (``input_step`` []). Both operands
are signed: in the Bi-Real topology of ``models.common.ConvUnit`` a quantized conv's input comes
from a shortcut sum and a PReLU, not from a ReLU, so it is often negative. On k-bit hardware
``(*)`` is an integer convolution of the codes, rescaled by s_a * s_w. The layers are the DFR-Det
paper's "LSQ 4-bit" baseline (its Table 2); they sow no reconstruction loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from dfrdet_jax.layers import quantizers
from dfrdet_jax.layers.binary import _as_tuple
from dfrdet_jax.layers.conv import (
    PaddingLike,
    channels_last_dimension_numbers,
    conv_general_dilated,
    explicit_padding,
)

Array = jax.Array

# E|x| of a unit-variance normal input (sqrt(2 / pi) ~ 0.8): the inputs of a quantized unit sit
# after a normalisation (or a sum of normalised branches), so they are of that scale.
TYPICAL_MEAN_ABS_INPUT = 0.8


def initial_input_step(bits: int) -> float:
    """LSQ's initial step 2 * E|x| / sqrt(q_max) for a unit-variance input, a constant.

    LSQ initialises the activation step from the first batch, but the detector is initialised
    on an all-zero dummy image (``steps.create_train_state``), where that rule gives a step of 0.
    """
    _, q_max = quantizers.lsq_levels(bits, signed=True)
    return 2 * TYPICAL_MEAN_ABS_INPUT / math.sqrt(q_max)


def _lsq_operands(module: nn.Module, x: Array, kernel_shape: tuple[int, ...]):
    """Declares ``module``'s kernel, ``weight_step`` [c_out] (init: LSQ's rule on the initial
    kernel, per output channel) and ``input_step`` [] (init: ``initial_input_step``); returns
    (q(x), q(kernel)) in the computation dtype."""
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    channel_axes = tuple(range(kernel.ndim - 1))
    weight_step = module.param(
        "weight_step",
        lambda _: quantizers.lsq_init_step(kernel, module.bits, axis=channel_axes).astype(
            module.param_dtype
        ),
    )
    input_step = module.param(
        "input_step",
        nn.initializers.constant(initial_input_step(module.bits)),
        (),
        module.param_dtype,
    )
    kernel = quantizers.lsq_quantize(kernel, weight_step, module.bits)
    x = quantizers.lsq_quantize(x, input_step, module.bits)
    return flax_dtypes.promote_dtype(x, kernel, dtype=module.dtype)


class LSQConv(nn.Module):
    """N-d k-bit convolution, channels last (NHWC for 2-d): out = q(x; s_a) (*) q(w; s_w).

    Attributes:
      features: number of output channels.
      kernel_size: spatial kernel size, e.g. (3, 3).
      strides: int or one per spatial dimension.
      padding: 'SAME', 'VALID', an int, or per-dimension ints / (low, high) pairs. The padding
        is zeros around the quantized input (0 is one of its levels).
      bits: bit width k of weights and inputs, 2-8.
      dtype: computation dtype (e.g. jnp.bfloat16); None promotes input and parameter dtypes.
      param_dtype: dtype of the parameters.
      kernel_init: initialiser of the real kernel [*kernel_size, c_in, features].
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    bits: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [batch, *spatial, c_in] -> [batch, *spatial_out, features]."""
        n = len(self.kernel_size)
        if x.ndim != n + 2:
            raise ValueError(
                f"LSQConv with a {n}-d kernel expects inputs [batch, {n} spatial dims, "
                f"channels], got shape {x.shape}"
            )
        strides = _as_tuple(self.strides, n, "strides")
        pads = explicit_padding(self.padding, x.shape[1:-1], self.kernel_size, strides, (1,) * n)
        x, kernel = _lsq_operands(self, x, (*self.kernel_size, x.shape[-1], self.features))
        return conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=pads,
            dimension_numbers=channels_last_dimension_numbers(x.ndim),
        )


class LSQDense(nn.Module):
    """k-bit dense layer: out = q(x; s_a) @ q(w; s_w) on the last axis.

    Attributes are those of ``LSQConv`` that apply to a dense layer.
    """

    features: int
    bits: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., c_in] -> [..., features]."""
        x, kernel = _lsq_operands(self, x, (x.shape[-1], self.features))
        return jnp.matmul(x, kernel)
