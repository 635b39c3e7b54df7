"""Activation helpers of the 1-bit literature: a learnable channel-wise shift and RPReLU.

``LearnableBias`` is the shift of ReActNet's RSign: placed before a binary layer, sign(x + b)
learns a per-channel threshold instead of the fixed 0. ``RPReLU`` (ReActNet) is a PReLU with
learnable per-channel shifts before and after it; with ``learn_shifts=False`` it is a plain
per-channel PReLU (the activation Bi-Real Net and the DFR-Det backbone use).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class LearnableBias(nn.Module):
    """x + b with a per-channel bias b (last axis), initialised to 0."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        return x + bias.astype(x.dtype)


@jax.custom_vjp
def prelu(x: Array, slope: Array) -> Array:
    """PReLU: x for x > 0, slope * x otherwise; ``slope`` broadcasts against ``x`` (a scalar or
    one per channel, the last axis).

    Its backward pass keeps x alone, where autodiff of ``jnp.where`` keeps the mask x > 0
    beside it (benchmarks/README.md, memory).
    """
    return jnp.where(x > 0, x, slope * x)


def _prelu_forward(x, slope):
    return prelu(x, slope), (x, slope)


def _prelu_backward(residuals, cotangent):
    x, slope = residuals
    positive = x > 0
    d_x = jnp.where(positive, cotangent, slope * cotangent)
    d_slope = jnp.where(positive, 0, cotangent * x)
    d_slope = jnp.sum(d_slope, axis=tuple(range(x.ndim - jnp.ndim(slope))))
    broadcast = tuple(i for i, n in enumerate(jnp.shape(slope)) if n == 1)
    d_slope = jnp.sum(d_slope, axis=broadcast, keepdims=True)
    return d_x, d_slope.astype(slope.dtype)


prelu.defvjp(_prelu_forward, _prelu_backward)


class RPReLU(nn.Module):
    """RPReLU(x) = PReLU_beta(x - gamma) + zeta, all three per channel (last axis).

    PReLU_beta(y) = y for y > 0 and beta * y otherwise; beta starts at ``negative_slope_init``,
    the shifts gamma and zeta at 0.
    """

    negative_slope_init: float = 0.25
    learn_shifts: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = (x.shape[-1],)
        slope = self.param(
            "negative_slope",
            nn.initializers.constant(self.negative_slope_init),
            channels,
            self.param_dtype,
        ).astype(x.dtype)
        if self.learn_shifts:
            shift_in = self.param(
                "shift_in", nn.initializers.zeros_init(), channels, self.param_dtype
            ).astype(x.dtype)
            x = x - shift_in
        y = prelu(x, slope)
        if self.learn_shifts:
            y = y + self.param(
                "shift_out", nn.initializers.zeros_init(), channels, self.param_dtype
            ).astype(x.dtype)
        return y
