"""Quantizers for 1-bit and k-bit networks, as pure functions with custom gradients.

Binarization uses ``sign`` as the DFR-Det paper defines it (Sec. 3.1, after Eq. 2: "returns one
if the input is greater than zero and -1 otherwise"): sign(x) = +1 for x > 0 and -1 for x <= 0,
everywhere in this library (weights, activations, L_R, the bit-packed export), so that a binarized
tensor only ever holds {-1, +1}. The forward pass of every binary quantizer below is that sign;
they differ only in the gradient they pass backwards (the straight-through estimator, STE), which
does not depend on the value chosen at 0 (each surrogate is evaluated at x itself):

  ``identity``  grad 1 everywhere (BinaryConnect's plain STE).
  ``clipped``   grad 1 where |x| <= 1, else 0 (the hardtanh STE of BNN / XNOR-Net / ReActNet).
  ``approx``    grad 2 - 2|x| where |x| <= 1, else 0 (ApproxSign of Bi-Real Net: the derivative of
                the piecewise-quadratic approximation of sign).

``lsq_quantize`` is the k-bit quantizer with a learned step size of Esser et al. (LSQ, ICLR 2020),
used for the 4-bit baseline of the DFR-Det paper's Table 2.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dfrdet_jax.choices import unknown_choice

Array = jax.Array


def sign(x: Array) -> Array:
    """The paper's hard sign: +1 for x > 0, -1 for x <= 0 (so sign(0) = -1); same shape and dtype
    as ``x``; its gradient is zero."""
    one = jnp.ones((), x.dtype)
    return jnp.where(x > 0, one, -one)


def _clipped_grad(x: Array) -> Array:
    return (jnp.abs(x) <= 1).astype(x.dtype)


def _approx_sign_grad(x: Array) -> Array:
    return jnp.maximum(2 - 2 * jnp.abs(x), 0).astype(x.dtype)


SURROGATE_GRADIENTS: dict[str, Callable[[Array], Array]] = {
    "identity": jnp.ones_like,
    "clipped": _clipped_grad,
    "approx": _approx_sign_grad,
}


def surrogate_gradient(name: str, what: str = "binary quantizer") -> Callable[[Array], Array]:
    """The STE surrogate gradient called ``name``; ValueError naming ``what`` and the choices
    for an unknown name."""
    try:
        return SURROGATE_GRADIENTS[name]
    except KeyError:
        raise unknown_choice(what, name, sorted(SURROGATE_GRADIENTS)) from None


def _make_ste(name: str, doc: str):
    """Builds sign(x) whose backward pass multiplies the cotangent by the surrogate ``name``."""
    surrogate_grad = SURROGATE_GRADIENTS[name]

    @jax.custom_vjp
    def ste(x):
        return sign(x)

    ste.defvjp(lambda x: (sign(x), x), lambda x, g: (g * surrogate_grad(x),))
    ste.__doc__ = doc
    return ste


sign_identity_ste = _make_ste(
    "identity", "sign(x) forward; gradient passed through unchanged (d/dx := 1)."
)
sign_clipped_ste = _make_ste(
    "clipped", "sign(x) forward; gradient 1 where |x| <= 1 (boundary included), else 0."
)
sign_approx_ste = _make_ste(
    "approx", "sign(x) forward; Bi-Real ApproxSign gradient 2 - 2|x| for |x| <= 1, else 0."
)

BINARY_QUANTIZERS: dict[str, Callable[[Array], Array]] = {
    "identity": sign_identity_ste,
    "clipped": sign_clipped_ste,
    "approx": sign_approx_ste,
}


def get_binary_quantizer(name: str | None) -> Callable[[Array], Array] | None:
    """Returns the binary quantizer called ``name``; ``None`` or "none" means no quantization.

    Raises:
      ValueError: for an unknown name, listing the valid choices.
    """
    if name is None or name == "none":
        return None
    try:
        return BINARY_QUANTIZERS[name]
    except KeyError:
        valid = sorted(BINARY_QUANTIZERS) + ["none"]
        raise unknown_choice("binary quantizer", name, valid) from None


def after_cotangent(x: Array, cotangent: Array) -> Array:
    """``x`` unchanged (a -0 becomes +0), computed only once ``cotangent`` exists.

    For a backward pass that recomputes a cheap function of a saved forward value: XLA:CPU
    computes such a function of forward values as early as it can, in the forward pass, and
    merges it with the forward pass's own copy, so that the recomputed value is held from the
    forward pass to the backward pass like a saved one (benchmarks/README.md, memory). Adding
    min(|c|, 0) for one element c of the cotangent adds zero (for any finite c; a NaN cotangent
    makes it NaN, as it makes the whole gradient) and ties the value to the backward pass.
    """
    if cotangent.size == 0:
        return x
    first = jnp.ravel(cotangent)[0]
    return x + jnp.minimum(jnp.abs(first), 0).astype(x.dtype)


def apply_to_sign(
    op: Callable[[Array, Array], Array],
    x: Array,
    operand: Array,
    quantizer: str,
    dtype: Any = None,
    prologue: Callable[..., Array] | None = None,
    prologue_args: tuple[Array, ...] = (),
    scale: Array | None = None,
) -> Array:
    """op(sign(u), operand) [* scale] with u = prologue(x, *prologue_args) (u = x without a
    prologue), the STE ``quantizer`` for u, and only x kept for the backward pass.

    The same value and gradients as ``op(get_binary_quantizer(quantizer)(u).astype(dtype),
    operand) [* scale]``, but the backward pass recomputes u and sign(u) from x instead of
    holding them from the forward pass: a binary layer's input costs one saved activation, not
    two, and with an element-wise prologue (the previous unit's RPReLU and this one's learnable
    bias, ``activations.Deferred``) that activation is the RPReLU's input, which its own
    gradient keeps anyway. Two more choices keep the backward pass's temporaries few
    (``benchmarks/README.md``, memory): the scale goes into the operand (op(b, w) * s =
    op(b, w * s)), so the cotangent reaches op unscaled and neither the scaled cotangent nor op's
    output is held; and op's gradient for the operand is taken before its gradient for the
    input, so sign(u) is freed before the input's gradient is made.

    Args:
      op: a differentiable function of (binarized input, operand), e.g. a convolution with a
        kernel.
      x: the input (to the prologue, if any), any shape ``op`` accepts.
      operand: the second argument of ``op`` (a kernel), differentiated as ``op`` says.
      quantizer: a name in ``SURROGATE_GRADIENTS``: the gradient passed to u.
      dtype: the dtype sign(u) is given to ``op`` in; None keeps u's.
      prologue: an element-wise, differentiable (x, *prologue_args) -> u; None: u = x.
      prologue_args: its arrays, differentiated.
      scale: a factor on op's output per output channel (a binary layer's alpha), [C_out];
        op must be linear in the operand with C_out its last axis (a convolution's HWIO kernel,
        a matmul's [C_in, C_out]). None: no scale.

    Returns:
      op's output.
    """
    surrogate_grad = surrogate_gradient(quantizer)
    prologue = prologue or (lambda x: x)

    def binarize(u):
        return sign(u).astype(dtype or u.dtype)

    @jax.custom_vjp
    def apply(x, operand, scale, prologue_args):
        y = op(binarize(prologue(x, *prologue_args)), operand)
        return y if scale is None else y * scale.astype(y.dtype)

    def forward(x, operand, scale, prologue_args):
        return apply(x, operand, scale, prologue_args), (x, operand, scale, prologue_args)

    def backward(residuals, cotangent):
        x, operand, scale, prologue_args = residuals
        u, prologue_vjp = jax.vjp(
            lambda x, args: prologue(x, *args), after_cotangent(x, cotangent), prologue_args
        )
        binary = binarize(u)
        # op(b, w) * s = op(b, w * s); s's gradient, sum(d(w * s) * w) over all but the output
        # axis, needs no activation.
        weights = operand
        if scale is not None:
            operand = after_cotangent(operand, cotangent)
            weights = operand * scale.astype(operand.dtype)
        # Each gradient of op alone (XLA drops the part of op's backward pass it does not use),
        # the input's tied to the operand's.
        d_weights = jax.vjp(lambda w: op(binary, w), weights)[1](cotangent)[0]
        d_binary = jax.vjp(lambda b: op(b, weights), binary)[1](
            after_cotangent(cotangent, d_weights)
        )[0]
        d_operand, d_scale = d_weights, None
        if scale is not None:
            d_operand = d_weights * scale.astype(d_weights.dtype)
            reduce = tuple(range(operand.ndim - 1))
            d_scale = jnp.sum(
                d_weights.astype(jnp.float32) * operand.astype(jnp.float32), axis=reduce
            ).astype(scale.dtype)
        d_x, d_prologue_args = prologue_vjp(d_binary.astype(u.dtype) * surrogate_grad(u))
        return d_x, d_operand, d_scale, d_prologue_args

    apply.defvjp(forward, backward)
    return apply(x, operand, scale, tuple(prologue_args))


def round_ste(x: Array) -> Array:
    """round(x) forward (half to even, as jnp.round), identity gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def scale_gradient(x: Array, scale: float | Array) -> Array:
    """Identity forward; multiplies the gradient by ``scale``."""
    return jax.lax.stop_gradient(x - x * scale) + x * scale


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (q_min, q_max) of a ``bits``-bit quantizer: (-8, 7) or (0, 15) for 4 bits."""
    if bits < 2:
        raise ValueError(
            f"LSQ needs at least 2 bits, got {bits}; use a binary quantizer for 1 bit."
        )
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_quantize(x: Array, step: Array, bits: int, signed: bool = True) -> Array:
    """LSQ fake-quantization: round(clip(x / s, q_min, q_max)) * s with a learned step ``s``.

    Gradients (Esser et al., Eq. 3 and the gradient scale g = 1 / sqrt(n * q_max), with n the
    number of values one step quantizes: numel(x) for a scalar step, as in the paper's
    per-tensor steps, and numel(x) / c for c per-channel steps, so that each step's summed
    gradient is scaled for the values it actually sees):
      d/dx = 1 inside the clipping range, else 0;
      d/ds = g * (round(x/s) - x/s) inside the range, g * q_min below it, g * q_max above it.

    Args:
      x: values to quantize, any shape.
      step: positive step size, broadcastable to ``x`` (a scalar or per-channel vector).
      bits: number of bits (>= 2).
      signed: signed range (weights, signed activations) or unsigned (post-ReLU activations).

    Returns:
      The de-quantized values, same shape and dtype as ``x``.
    """
    q_min, q_max = lsq_levels(bits, signed)
    grad_scale = 1.0 / jnp.sqrt(x.size // jnp.size(step) * q_max)
    s = scale_gradient(step, grad_scale).astype(x.dtype)
    return round_ste(jnp.clip(x / s, q_min, q_max)) * s


def lsq_init_step(x: Array, bits: int, signed: bool = True, axis=None) -> Array:
    """The LSQ initial step 2 * mean|x| / sqrt(q_max), over ``axis`` (None: a scalar)."""
    _, q_max = lsq_levels(bits, signed)
    return 2 * jnp.mean(jnp.abs(x), axis=axis) / jnp.sqrt(q_max)
