"""Convolution whose kernel gradient XLA:CPU computes at matrix-product speed.

XLA:CPU computes a large convolution's kernel gradient (the input correlated with the output
cotangent, summed over batch and space) several times slower than its forward pass or its input
gradient: for the head's 3x3, 256-channel conv over P2 of a 512 px image (batch 2), forward and
kernel gradient take 1,354 ms where forward and input gradient take 288 and the forward alone
144 (``benchmarks/conv_speed.py``, 2-core CPU). That gradient is a sum over the kernel's taps of
one matrix product each,

    dK[tap] = x^T @ g_tap     x:     the input                                [B * H * W, C_in]
                              g_tap: the output cotangent moved to the pixels [B * H * W, C_out]
                                     the tap reads (zero elsewhere)

which XLA:CPU runs at matmul speed (383 ms for forward and kernel gradient above).
``conv_general_dilated`` takes ``jax.lax``'s signature (flax's ``nn.Conv`` accepts it, see
``Conv``) and computes the forward pass and the input gradient with XLA's convolution; on CPU,
for large enough stride-1 convolutions, the kernel gradient is the sum above. XLA:CPU's kernel
gradient of a strided convolution is slow too (ResNet-18's stem at 800 px, batch 2: forward and
both gradients 598-617 ms, of which the forward pass is 82-99). There the input pixels each tap
reads are one strided slice of the input, so for large enough strided convolutions the kernel
gradient is one matmul over those slices side by side,

    dK = P^T @ g              P: the patches   [B * output pixels, taps * C_in]
                              g: the cotangent [B * output pixels, C_out]

(the stem's forward and both gradients then take 461-481 ms; ``benchmarks/conv_speed.py
--stride 2``, benchmarks/README.md). Everywhere else (other platforms, small convolutions,
channels-first layouts, groups, input dilation) it is ``jax.lax.conv_general_dilated``
unchanged.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfrdet_jax.choices import unknown_choice
from dfrdet_jax.layers.quantizers import after_cotangent

Array = jax.Array
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

# The tap sum pays off only for large convolutions: it reads the input once per tap, and its
# matmuls are memory-bound when the channels are few. On this project's 2-core CPU (``python
# benchmarks/conv_speed.py --sweep``, results/conv_speed_sweep.json), XLA's own kernel gradient
# was faster up to 2^25 multiply-adds per tap (batch x output pixels x C_in x C_out: every conv
# of the demo networks), the two traded places around 2^27 (0.7-2.9x between runs), and the
# taps were 2.7-4.5x faster from 2^28 up (e.g. 256 channels on P2 or P3 of a 512 px image).
MIN_MULTIPLY_ADDS_PER_TAP = 2**28
# The patches' matmul of a strided convolution (``benchmarks/conv_speed.py --stride 2``, this
# 2-core CPU): faster than XLA's kernel gradient for ResNet-18's strided convs at 800 px (the
# stem's 7x7 at 2^25.9 multiply-adds per tap, the 3x3 and 1x1 at 2^27.3) and RetinaNet's P6
# conv there (2^25.4); timed by hand, as fast for the stem at 512 px (2^24.6) and slower for
# the stem at 256 and 128 px (2^22.6 and below).
MIN_MULTIPLY_ADDS_PER_TAP_STRIDED = 2**25


def explicit_padding(
    padding: PaddingLike,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
) -> list[tuple[int, int]]:
    """Resolves a padding spec into explicit (low, high) pads per spatial dimension.

    'SAME' matches XLA/flax: output size ceil(n / stride), extra padding on the high side.
    An int p pads p on both sides; a sequence gives one int or one (low, high) pair per dimension.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return [(0, 0)] * n
        if mode != "SAME":
            raise unknown_choice(
                "padding",
                padding,
                ("SAME", "VALID"),
                "or an int, or per-dimension ints or (low, high) pairs",
            )
        pads = []
        for size, k, s, d in zip(input_size, kernel_size, strides, dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * n
    padding = list(padding)
    if len(padding) != n:
        raise ValueError(f"padding must have {n} entries for a {n}-d convolution, got {padding}")
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def channels_last_dimension_numbers(ndim: int) -> tuple[str, str, str]:
    """('NHWC', 'HWIO', 'NHWC') and its 1-d / 3-d forms, for inputs of ``ndim`` dimensions."""
    spatial = "DHW"[-(ndim - 2) :]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _xla_conv(x, kernel, strides, pads, dilation, precision):
    """XLA's channels-last convolution."""
    return lax.conv_general_dilated(
        x, kernel, strides, pads, rhs_dilation=dilation,
        dimension_numbers=channels_last_dimension_numbers(x.ndim), precision=precision,
    )  # fmt: skip


def kernel_gradient_by_taps(
    x: Array,
    cotangent: Array,
    kernel_shape: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    precision: Any = None,
) -> Array:
    """The kernel gradient of a stride-1, channels-last convolution as one matmul per tap.

    Tap t of the kernel reads input pixel i for output pixel i - shift_t, so its gradient is
    x^T @ (the cotangent moved by shift_t onto the input's grid, zero where no output reads).
    The moved cotangents are windows of one padded copy of it, taken one tap at a time in a
    loop, so that one window is alive at a time; moving a copy of the input instead would let
    XLA:CPU make every copy in the forward pass and hold them all to the backward pass (it
    computes a forward value's copies as soon as it can; see benchmarks/README.md).

    Args:
      x: the convolution's input [B, *spatial, C_in].
      cotangent: the gradient of its output [B, *spatial_out, C_out].
      kernel_shape: [*window, C_in, C_out].
      pads: the convolution's (low, high) padding per spatial dimension (negative crops).
      dilation: the kernel's dilation per spatial dimension.

    Returns:
      d(sum(output * cotangent)) / d kernel, [*window, C_in, C_out], accumulated and returned
      in float32.
    """
    *window, c_in, c_out = kernel_shape
    # shift_t per dimension = t * dilation - pad_low; the padded cotangent holds every window.
    shifts = np.array(
        [[t * d - lo for t, d, (lo, _) in zip(tap, dilation, pads)]
         for tap in itertools.product(*(range(k) for k in window))]
    )  # fmt: skip
    size = np.array(x.shape[1:-1])
    low = np.maximum(shifts.max(axis=0), 0)
    high = np.maximum((size - shifts - np.array(cotangent.shape[1:-1])).max(axis=0), 0)
    padded = lax.pad(
        cotangent,
        jnp.zeros((), cotangent.dtype),
        [(0, 0, 0), *((int(lo), int(hi), 0) for lo, hi in zip(low, high)), (0, 0, 0)],
    )
    inputs = x.reshape(-1, c_in)

    def tap_gradient(start):
        moved = lax.dynamic_slice(padded, (0, *start, 0), (*x.shape[:-1], c_out))
        return lax.dot_general(
            inputs, moved.reshape(-1, c_out), (((0,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        )  # fmt: skip

    starts = jnp.asarray(low - shifts, jnp.int32)
    # The loop's buffer starts as the first tap's gradient, not as zeros: XLA:CPU would make a
    # zero buffer in the forward pass and hold it until the loop runs in the backward pass.
    first = tap_gradient(starts[0])
    taps = lax.fori_loop(
        1,
        len(shifts),
        lambda t, taps: lax.dynamic_update_index_in_dim(taps, tap_gradient(starts[t]), t, 0),
        jnp.broadcast_to(first, (len(shifts), *first.shape)),
    )
    return taps.reshape(kernel_shape)


def tap_views(
    padded: Array,
    window: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
) -> list[Array]:
    """Each tap's view of a padded input [B, *spatial, C] on the output grid, taps in
    row-major order: tap t reads padded pixel o * stride + t * dilation for output pixel o, so
    its view is one strided slice, [B, *out_size, C]."""
    batch, *_, channels = padded.shape
    views = []
    for tap in itertools.product(*(range(k) for k in window)):
        start = [t * d for t, d in zip(tap, dilation)]
        limit = [a + s * (n - 1) + 1 for a, s, n in zip(start, strides, out_size)]
        views.append(lax.slice(padded, (0, *start, 0), (batch, *limit, channels), (1, *strides, 1)))
    return views


def kernel_gradient_by_patches(
    x: Array,
    cotangent: Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    precision: Any = None,
) -> Array:
    """The kernel gradient of a channels-last convolution as one matmul over its input patches.

    Tap t of the kernel reads, for output pixel o, padded input pixel o * stride + t * dilation:
    over all output pixels, one strided slice of the padded input. The slices of every tap side
    by side on the channel axis are the patch matrix P [B * output pixels, taps * C_in], and the
    gradient is P^T @ cotangent. P is built from the input only once the cotangent exists
    (``after_cotangent``): XLA:CPU would otherwise build it in the forward pass and hold it to
    the backward pass.

    Args:
      x: the convolution's input [B, *spatial, C_in].
      cotangent: the gradient of its output [B, *spatial_out, C_out].
      kernel_shape: [*window, C_in, C_out].
      strides: the convolution's stride per spatial dimension.
      pads: its (low, high) padding per spatial dimension (negative crops).
      dilation: the kernel's dilation per spatial dimension.

    Returns:
      d(sum(output * cotangent)) / d kernel, [*window, C_in, C_out], accumulated and returned
      in float32.
    """
    *window, c_in, c_out = kernel_shape
    padded = lax.pad(
        after_cotangent(x, cotangent),
        jnp.zeros((), x.dtype),
        [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)],
    )
    columns = tap_views(padded, window, strides, dilation, cotangent.shape[1:-1])
    patches = jnp.concatenate(columns, axis=-1).reshape(-1, len(columns) * c_in)
    grad = lax.dot_general(
        patches, cotangent.reshape(-1, c_out), (((0,), (0,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32,
    )  # fmt: skip
    return grad.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_with_cpu_kernel_gradient(x, kernel, strides, pads, dilation, precision):
    return _xla_conv(x, kernel, strides, pads, dilation, precision)


def _forward(x, kernel, strides, pads, dilation, precision):
    return _xla_conv(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _backward(strides, pads, dilation, precision, residuals, cotangent):
    x, kernel = residuals

    def conv(x, kernel):
        return _xla_conv(x, kernel, strides, pads, dilation, precision)

    (input_grad,) = jax.vjp(lambda x: conv(x, kernel), x)[1](cotangent)

    def on_cpu(x, cotangent):
        if all(s == 1 for s in strides):
            grad = kernel_gradient_by_taps(x, cotangent, kernel.shape, pads, dilation, precision)
        else:
            grad = kernel_gradient_by_patches(
                x, cotangent, kernel.shape, strides, pads, dilation, precision
            )
        return grad.astype(kernel.dtype)

    def by_xla(x, cotangent):
        return jax.vjp(lambda k: conv(x, k), kernel)[1](cotangent)[0]

    kernel_grad = lax.platform_dependent(x, cotangent, cpu=on_cpu, default=by_xla)
    return input_grad, kernel_grad


_conv_with_cpu_kernel_gradient.defvjp(_forward, _backward)


def _is_channels_last(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:  # lax's default is channels-first
        return False
    expected = channels_last_dimension_numbers(len(lhs_shape))
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == (
        lax.conv_dimension_numbers(lhs_shape, rhs_shape, expected)
    )


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: PaddingLike,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``jax.lax.conv_general_dilated`` with the kernel gradient computed by taps (stride 1) or
    patches (strided) on CPU.

    Same arguments and result. These forms serve channels-last convolutions (NHWC / HWIO and
    their 1-d and 3-d forms) with no groups, no input dilation, no ``preferred_element_type``
    and at least ``MIN_MULTIPLY_ADDS_PER_TAP`` (stride 1) or
    ``MIN_MULTIPLY_ADDS_PER_TAP_STRIDED`` multiply-adds per tap; anything else is
    ``jax.lax.conv_general_dilated`` itself.
    """
    n = lhs.ndim - 2
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1,) * n)
    covered = (
        feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1,) * n))
        and _is_channels_last(dimension_numbers, lhs.shape, rhs.shape)
    )
    if covered:
        pads = explicit_padding(padding, lhs.shape[1:-1], rhs.shape[:-2], strides, dilation)
        threshold = (
            MIN_MULTIPLY_ADDS_PER_TAP
            if all(s == 1 for s in strides)
            else MIN_MULTIPLY_ADDS_PER_TAP_STRIDED
        )
        if multiply_adds_per_tap(lhs.shape, rhs.shape, strides, pads, dilation) >= threshold:
            return _conv_with_cpu_kernel_gradient(
                lhs, rhs, strides, tuple(pads), dilation, precision
            )
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
    )  # fmt: skip


def multiply_adds_per_tap(lhs_shape, rhs_shape, strides, pads, dilation) -> int:
    """batch x output pixels x C_in x C_out of a channels-last convolution: the multiply-adds
    of each tap in its kernel gradient."""
    out_pixels = math.prod(
        (size + lo + hi - (k - 1) * d - 1) // s + 1
        for size, k, s, (lo, hi), d in zip(lhs_shape[1:-1], rhs_shape[:-2], strides, pads, dilation)
    )
    return lhs_shape[0] * out_pixels * rhs_shape[-2] * rhs_shape[-1]


class Conv(nn.Conv):
    """``flax.linen.Conv`` (same attributes and parameters) through ``conv_general_dilated``: on
    CPU a large one's kernel gradient is computed by taps or patches."""

    conv_general_dilated: Callable | None = conv_general_dilated
