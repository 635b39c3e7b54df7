"""Activation helpers of the 1-bit literature: a learnable channel-wise shift and RPReLU.

``LearnableBias`` is the shift of ReActNet's RSign: placed before a binary layer, sign(x + b)
learns a per-channel threshold instead of the fixed 0. ``RPReLU`` (ReActNet) is a PReLU with
learnable per-channel shifts before and after it; with ``learn_shifts=False`` it is a plain
per-channel PReLU (the activation Bi-Real Net and the DFR-Det backbone use).

``Deferred`` carries an activation not computed yet, from ``RPReLU(x, defer=True)`` through
``LearnableBias`` to a binary layer, which computes it inside its own op and recomputes it in
its backward pass (``quantizers.apply_to_sign``).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Deferred:
    """An element-wise function of an activation, not computed yet: fn(source, *args).

    A 1-bit unit hands its RPReLU on in this form so that the next binary layer computes it
    inside its own op, whose backward pass then keeps ``source`` (the RPReLU's input, which the
    RPReLU's own gradient needs anyway) and recomputes the rest: one saved activation where the
    RPReLU's output would be a second (benchmarks/README.md, memory).

    Attributes:
      source: the activation the chain starts from, [..., C].
      args: the chain's parameters (arrays), in the order ``fn`` takes them.
      fn: (source, *args) -> value, element-wise (the value has ``source``'s shape); static.
    """

    source: Array
    args: tuple[Array, ...]
    fn: Callable = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def ndim(self) -> int:
        return self.source.ndim

    @property
    def dtype(self) -> Any:
        return self.source.dtype

    def value(self) -> Array:
        """The activation itself, computed."""
        return self.fn(self.source, *self.args)

    def then(self, fn: Callable, *args: Array) -> Deferred:
        """This chain followed by fn(value, *args)."""
        first, n = self.fn, len(self.args)

        def chain(source, *all_args):
            return fn(first(source, *all_args[:n]), *all_args[n:])

        return Deferred(self.source, (*self.args, *args), chain)


def computed(x: Array | Deferred) -> Array:
    """x itself, or a ``Deferred`` x's value, computed."""
    return x.value() if isinstance(x, Deferred) else x


class LearnableBias(nn.Module):
    """x + b with a per-channel bias b (last axis), initialised to 0; a ``Deferred`` x gives a
    ``Deferred`` that adds b last."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array | Deferred) -> Array | Deferred:
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        bias = bias.astype(x.dtype)
        if isinstance(x, Deferred):
            return x.then(jnp.add, bias)
        return x + bias


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


def _shifted_prelu(x: Array, slope: Array, shift_in: Array, shift_out: Array) -> Array:
    return prelu(x - shift_in, slope) + shift_out


class RPReLU(nn.Module):
    """RPReLU(x) = PReLU_beta(x - gamma) + zeta, all three per channel (last axis).

    PReLU_beta(y) = y for y > 0 and beta * y otherwise; beta starts at ``negative_slope_init``,
    the shifts gamma and zeta at 0. Called with ``defer=True`` it returns the same function as
    a ``Deferred``, for a binary layer to compute.
    """

    negative_slope_init: float = 0.25
    learn_shifts: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, defer: bool = False) -> Array | Deferred:
        channels = (x.shape[-1],)
        args = [
            self.param(
                "negative_slope",
                nn.initializers.constant(self.negative_slope_init),
                channels,
                self.param_dtype,
            )
        ]
        fn = prelu
        if self.learn_shifts:
            fn = _shifted_prelu
            for name in ("shift_in", "shift_out"):
                args.append(
                    self.param(name, nn.initializers.zeros_init(), channels, self.param_dtype)
                )
        deferred = Deferred(x, tuple(a.astype(x.dtype) for a in args), fn)
        return deferred if defer else deferred.value()
