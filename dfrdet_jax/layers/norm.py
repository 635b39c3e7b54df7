"""GroupNorm whose backward pass keeps its input alone.

Autodiff of ``flax.linen.GroupNorm`` keeps two activation-sized buffers per layer from the forward
pass to the backward pass: the input (for the variance's gradient) and the centred input x - mean
(for the normalisation's). ``group_norm`` computes flax's values (statistics in float32 or wider,
its fast variance E[x^2] - E[x]^2 clamped at 0, its order of operations) and a backward pass
written by hand. That pass keeps the input and the per-group statistics. It recomputes the centred
input once the cotangent exists (``quantizers.after_cotangent``; XLA:CPU would otherwise compute
it in the forward pass and hold it). ``GroupNorm`` is flax's module with the same parameters
('scale', 'bias'), so checkpoints carry over (benchmarks/README.md, memory).

With x_hat = (x - mean) * r, r = 1 / sqrt(var + eps) over the n values of a group of one example,
and dx_hat = dy * scale:

    dx = r * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))
    dscale = sum of dy * x_hat over examples and positions,  dbias = sum of dy

The last term of dx drops where the clamp holds the variance at 0, as in autodiff of the clamp.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from dfrdet_jax.layers.quantizers import after_cotangent

Array = jax.Array


def _compute_dtype(x: Array) -> Any:
    """flax's statistics dtype: x's, at least float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _statistics(x: Array, num_groups: int, epsilon: float) -> tuple[Array, Array, Array]:
    """Per example and group of x [B, ..., C]: mean, 1 / sqrt(var + eps) and whether the
    variance was positive before the clamp, each [B, 1, ..., C] (a group's value on each of its
    channels)."""
    grouped = x.astype(_compute_dtype(x)).reshape(*x.shape[:-1], num_groups, -1)
    axes = (*range(1, x.ndim - 1), x.ndim)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    variance = jnp.mean(jnp.square(grouped), axis=axes, keepdims=True) - jnp.square(mean)
    inv_std = jax.lax.rsqrt(jnp.maximum(variance, 0.0) + epsilon)

    def per_channel(statistic):
        return jnp.repeat(statistic[..., 0], x.shape[-1] // num_groups, axis=-1)

    return per_channel(mean), per_channel(inv_std), per_channel(variance > 0)


def _group_mean(sums: Array, num_groups: int, positions: int) -> Array:
    """Per-channel sums over positions [B, C] -> each group's mean over its values (its
    channels' ``positions`` positions each), on its channels, [B, C]."""
    grouped = sums.reshape(sums.shape[0], num_groups, -1)
    means = jnp.sum(grouped, axis=-1, keepdims=True) / (grouped.shape[-1] * positions)
    return jnp.broadcast_to(means, grouped.shape).reshape(sums.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
    return _normalize_forward(x, scale, bias, num_groups, epsilon)[0]


def _normalize_forward(x, scale, bias, num_groups, epsilon):
    mean, inv_std, positive = _statistics(x, num_groups, epsilon)
    dtype = mean.dtype
    # flax's order of operations: (x - mean) * (inv_std * scale) + bias.
    y = (x.astype(dtype) - mean) * (inv_std * scale.astype(dtype)) + bias.astype(dtype)
    return y, (x, scale, bias, mean, inv_std, positive)


def _normalize_backward(num_groups, epsilon, residuals, cotangent):
    del epsilon  # inside inv_std
    x, scale, bias, mean, inv_std, positive = residuals
    dtype = mean.dtype
    # Sums over positions to [B, C] first, then over each group's channels: XLA:CPU reduces an
    # element-wise expression of x and the cotangent over the positions without writing it
    # out, which it does not when reducing a group's positions and channels in one go.
    positions = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1])
    per_example = (x.shape[0], x.shape[-1])
    centred = after_cotangent(x, cotangent).astype(dtype) - mean
    d_y = cotangent.astype(dtype)
    sum_d_y = jnp.sum(d_y, axis=positions).reshape(per_example)
    sum_d_y_centred = jnp.sum(d_y * centred, axis=positions).reshape(per_example)
    gamma = scale.astype(dtype)
    inv = inv_std.reshape(per_example)
    mean_d_x_hat = _group_mean(sum_d_y * gamma, num_groups, n)
    mean_d_x_hat_x_hat = _group_mean(sum_d_y_centred * gamma, num_groups, n) * inv
    mean_d_x_hat_x_hat = jnp.where(positive.reshape(per_example), mean_d_x_hat_x_hat, 0.0)
    expand = lambda a: a.reshape(mean.shape)  # noqa: E731  [B, C] -> [B, 1, ..., C]
    d_x = inv_std * (
        d_y * gamma - expand(mean_d_x_hat) - centred * inv_std * expand(mean_d_x_hat_x_hat)
    )
    d_scale = jnp.sum(sum_d_y_centred * inv, axis=0)
    d_bias = jnp.sum(sum_d_y, axis=0)
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_normalize.defvjp(_normalize_forward, _normalize_backward)


def group_norm(
    x: Array,
    scale: Array,
    bias: Array,
    num_groups: int,
    epsilon: float = 1e-6,
    dtype: Any = None,
) -> Array:
    """GroupNorm of x [B, ..., C] over each example's positions and C / num_groups channels.

    The values of ``flax.linen.GroupNorm`` with the same settings, with a backward pass that
    keeps x alone (module docstring).

    Args:
      x: [B, ..., C] (a [B, C] input normalises over channels only), C divisible by
        ``num_groups``.
      scale, bias: [C].
      num_groups: groups of channels sharing statistics.
      epsilon: added to the variance.
      dtype: the output dtype; None promotes those of x, scale and bias.

    Returns:
      [B, ..., C] in ``dtype``.
    """
    channels = x.shape[-1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"{num_groups} groups do not divide the {channels} channels")
    dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)
    return _normalize(x, scale, bias, num_groups, epsilon).astype(dtype)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm`` (its parameters 'scale' and 'bias', [C], and defaults) computed
    by ``group_norm``; x [B, ..., C] -> the same shape."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones_init(), channels, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), channels, self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)
