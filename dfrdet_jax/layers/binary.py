"""1-bit convolution and dense layers with a channel-wise scale and the reconstruction loss L_R.

Both layers compute, for input activations ``a`` and latent real weights ``w`` (paper, Eq. 2):

    out = alpha * (q_a(a) (*) sign(w)) [+ bias]

where ``q_a`` is the chosen activation quantizer (or none, for a real input), ``(*)`` is the
convolution / matmul (an XNOR-bitcount on 1-bit hardware, since both operands are +-1), and
``alpha`` is a per-output-channel scale:

  ``learned``  alpha = |p| for the parameter p (called ``alpha``) initialised to mean|w| over each
               output channel (DFR-Det, Eq. 2-3);
  ``mean``     mean|w| recomputed every step and detached from the gradient (XNOR-Net/ReActNet);
  ``none``     no scale (alpha = 1).

alpha is positive, as the paper's (alpha in R_+, after Eq. 2), and ``sign`` is the paper's
(sign(0) = -1, see ``quantizers``), so the signs of a channel's weights are those of sign(w)
alone. The learned parameter p may still cross zero in training (nothing bounds an SGD step); it
then scales by |p|, so its channel is never flipped (``_binarize_kernel`` says why |p| rather
than a clamp).

With a scale, each layer sows its reconstruction error (paper, Eq. 3) once, however often it
is called:

    L_R(w, alpha) = 1/2 * || w - alpha o sign(w) ||_2^2

into the ``losses`` collection under the name ``reconstruction`` (only when that collection is
mutable). ``sign(w)`` is treated as a constant inside L_R (its true derivative is zero almost
everywhere), so dL_R/dw = w - alpha*sign(w) and dL_R/dalpha_c = n_c*alpha_c - sum_c |w| with
n_c the number of weights of output channel c (w * sign(w) = |w| for every w, zero included);
for the learned parameter, alpha_c = |p_c| gives dL_R/dp_c = sign(p_c) * (n_c*|p_c| - sum_c |w|).
L_R is thus minimised by alpha = |p| = mean|w|. ``total_reconstruction_loss`` sums every sown
L_R of a model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from dfrdet_jax.choices import check_choice
from dfrdet_jax.layers import quantizers
from dfrdet_jax.layers.activations import Deferred, computed
from dfrdet_jax.layers.conv import (
    PaddingLike,
    channels_last_dimension_numbers,
    conv_general_dilated,
    explicit_padding,
)

Array = jax.Array

SCALE_MODES = ("learned", "mean", "none")
LOSSES_COLLECTION = "losses"
RECONSTRUCTION_LOSS_NAME = "reconstruction"


def reconstruction_loss(kernel: Array, alpha: Array) -> Array:
    """L_R = 1/2 * ||w - alpha o sign(w)||^2, a float32 scalar.

    Gradients (module docstring): d/dw = w - alpha * sign(w), d/dalpha_c = n_c * alpha_c -
    sum_c |w|, with sign(w) held constant.

    Args:
      kernel: latent weights, output channels on the last axis, e.g. [kh, kw, c_in, c_out].
      alpha: per-output-channel scale [c_out], as the layer applies it (positive: |p| for the
        learned parameter p).
    """
    kernel = kernel.astype(jnp.float32)
    binary = jax.lax.stop_gradient(quantizers.sign(kernel))
    return 0.5 * jnp.sum(jnp.square(kernel - alpha.astype(jnp.float32) * binary))


def binarize_with_reconstruction(
    kernel: Array, alpha: Array, quantizer: str
) -> tuple[Array, Array]:
    """(sign(kernel) with the weight STE ``quantizer``, ``reconstruction_loss(kernel, alpha)``),
    with the gradients of both.

    One op, so that its backward pass computes L_R's gradient beside the STE's, from ``kernel``
    and ``alpha`` (which the step keeps anyway) once the kernel's own cotangent exists. Autodiff
    of L_R alone holds w - alpha * sign(w), a second copy of every binary kernel, from the
    forward pass to the start of the backward pass, where the step's memory peaks
    (benchmarks/README.md, memory).
    """
    surrogate_grad = quantizers.surrogate_gradient(quantizer, "weight quantizer")

    @jax.custom_vjp
    def apply(kernel, alpha):
        return quantizers.sign(kernel), reconstruction_loss(kernel, alpha)

    def forward(kernel, alpha):
        return apply(kernel, alpha), (kernel, alpha)

    def backward(residuals, cotangents):
        kernel, alpha = residuals
        d_binary, d_loss = cotangents
        late_kernel = quantizers.after_cotangent(kernel, d_binary)
        weights = late_kernel.astype(jnp.float32)
        binary = quantizers.sign(weights)
        error = weights - alpha.astype(jnp.float32) * binary  # d L_R / d w
        d_kernel = d_binary * surrogate_grad(late_kernel) + d_loss * error
        d_alpha = -d_loss * jnp.sum(error * binary, axis=tuple(range(kernel.ndim - 1)))
        return d_kernel.astype(kernel.dtype), d_alpha.astype(alpha.dtype)

    apply.defvjp(forward, backward)
    return apply(kernel, alpha)


def total_reconstruction_loss(losses: Any) -> Array:
    """Sums every L_R sown by binary layers anywhere in a (nested) ``losses`` collection.

    Args:
      losses: the ``losses`` collection returned by ``model.apply(..., mutable=['losses'])``
        (or the whole mutable-variables dict that contains it).

    Returns:
      A float32 scalar (0.0 when no layer sowed an L_R).
    """
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(losses)[0]:
        keys = [getattr(entry, "key", None) for entry in path]
        if RECONSTRUCTION_LOSS_NAME in keys:
            total = total + jnp.sum(leaf.astype(jnp.float32))
    return total


def _binarize_kernel(module: nn.Module, kernel: Array) -> tuple[Array, Array | None]:
    """sign(kernel) with the module's weight STE, and its per-output-channel scale (or None).

    Declares the ``alpha`` parameter for the ``learned`` mode and sows L_R. Without a weight
    quantizer the kernel stays real and unscaled (``scale`` does not apply).
    """
    check_choice("scale", module.scale, SCALE_MODES)
    quantize_weight = quantizers.get_binary_quantizer(module.weight_quantizer)
    if quantize_weight is None:  # real weights: no sign, hence no scale and no L_R
        return kernel, None
    reduce_axes = tuple(range(kernel.ndim - 1))
    mean_abs = lambda: jnp.mean(jnp.abs(kernel), axis=reduce_axes)  # noqa: E731
    if module.scale == "learned":
        # The paper's alpha is positive. The parameter p is used through its absolute value rather
        # than a clamp max(p, eps): |p| is the identity on its initial value mean|w| > 0 and on
        # every alpha that stays positive (checkpoints, the alphas derived by warm start and the
        # export are unchanged), while a clamp has zero gradient below eps, so an alpha that an
        # SGD step pushed there would stay stuck (neither L_R nor the task could pull it back).
        # Through |p| both gradients keep flowing (times sign(p)) and L_R keeps pulling |p|
        # towards mean|w|. A negative p then scales by -p > 0: its channel is never flipped.
        alpha = jnp.abs(module.param("alpha", lambda _: mean_abs().astype(module.param_dtype)))
    elif module.scale == "mean":
        alpha = jax.lax.stop_gradient(mean_abs())
    else:
        alpha = None
    if alpha is None or not module.is_mutable_collection(LOSSES_COLLECTION):
        return quantize_weight(kernel), alpha
    binary, loss = binarize_with_reconstruction(kernel, alpha, module.weight_quantizer)
    # Eq. 3 sums over layers, so a layer called several times (a head shared over the pyramid
    # levels) keeps one L_R, its latest call's (the same every call), instead of one per call;
    # the earlier calls' copies add nothing to the loss.
    module.sow(
        LOSSES_COLLECTION, RECONSTRUCTION_LOSS_NAME, loss, reduce_fn=lambda _, latest: (latest,)
    )
    return binary, alpha


def _binary_operands(module: nn.Module, x: Array, kernel_shape: tuple[int, ...]):
    """Declares ``module``'s kernel (and alpha, bias); returns (sign(kernel) in the computation
    dtype, alpha or None, bias or None)."""
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    binary_kernel, alpha = _binarize_kernel(module, kernel)
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    given = x.source if isinstance(x, Deferred) else x  # a Deferred value has its source's dtype
    dtype = flax_dtypes.canonicalize_dtype(given, binary_kernel, dtype=module.dtype)
    return binary_kernel.astype(dtype), alpha, bias


def _apply_to_input(
    module: nn.Module,
    op: Callable,
    x: Array | Deferred,
    binary_kernel: Array,
    alpha: Array | None,
    bias: Array | None,
) -> Array:
    """alpha * op(q_a(x), binary_kernel) [+ bias] with the module's input quantizer, in the
    kernel's dtype; a binarized input (and a ``Deferred`` one's activation) is recomputed in the
    backward pass rather than saved, and alpha is applied inside that op
    (``quantizers.apply_to_sign``)."""
    if quantizers.get_binary_quantizer(module.input_quantizer) is None:
        y = op(computed(x).astype(binary_kernel.dtype), binary_kernel)
        if alpha is not None:
            y = y * alpha.astype(y.dtype)
    else:
        source, prologue, args = (
            (x.source, x.fn, x.args) if isinstance(x, Deferred) else (x, None, ())
        )
        y = quantizers.apply_to_sign(
            op, source, binary_kernel, module.input_quantizer, binary_kernel.dtype, prologue, args,
            alpha,
        )  # fmt: skip
    return y if bias is None else y + bias.astype(y.dtype)


def _as_tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{what} must have {n} entries for a {n}-d convolution, got {value}")
    return value


class BinaryConv(nn.Module):
    """N-d 1-bit convolution, channels last (NHWC for 2-d): out = alpha * (q_a(x) (*) sign(w)).

    Attributes:
      features: number of output channels.
      kernel_size: spatial kernel size, e.g. (3, 3).
      strides: int or one per spatial dimension.
      padding: 'SAME', 'VALID', an int, or per-dimension ints / (low, high) pairs.
      kernel_dilation: int or one per spatial dimension.
      feature_group_count: number of groups; must divide the input and output channels.
      use_bias: adds a real bias after the scale.
      input_quantizer: 'approx' (Bi-Real), 'clipped', 'identity', or None / 'none' for a real input.
      weight_quantizer: the weight STE: 'clipped' (ReActNet), 'identity' or 'approx'; None /
        'none' keeps real weights (no scale, no L_R): with a binary input that is ReActNet's
        first training step, with a real input the 1-bit topology computed in real values.
      scale: 'learned' (|alpha|, alpha initialised to mean|w|), 'mean' (detached mean|w|) or
        'none'.
      pad_value: the value written into the padding of the (quantized) input. A binarized input
        padded with +1 or -1 stays in {-1, +1}; 0 matches zero padding of the peer implementations.
      dtype: computation dtype (e.g. jnp.bfloat16); None promotes input and parameter dtypes.
      param_dtype: dtype of the parameters.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = False
    input_quantizer: str | None = "approx"
    weight_quantizer: str = "clipped"
    scale: str = "learned"
    pad_value: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array | Deferred) -> Array:
        """x: [batch, *spatial, c_in] (an array or a ``Deferred`` activation) -> [batch,
        *spatial_out, features]."""
        n = len(self.kernel_size)
        if not 1 <= n <= 3:
            raise ValueError(
                f"BinaryConv supports 1-3 spatial dimensions, got kernel {self.kernel_size}"
            )
        if x.ndim != n + 2:
            raise ValueError(
                f"BinaryConv with a {n}-d kernel expects inputs [batch, {n} spatial dims, "
                f"channels], got shape {x.shape}"
            )
        in_features = x.shape[-1]
        groups = self.feature_group_count
        if in_features % groups or self.features % groups:
            raise ValueError(
                f"feature_group_count={groups} must divide the input channels "
                f"({in_features}) and the output channels ({self.features})"
            )
        strides = _as_tuple(self.strides, n, "strides")
        dilation = _as_tuple(self.kernel_dilation, n, "kernel_dilation")
        binary_kernel, alpha, bias = _binary_operands(
            self, x, (*self.kernel_size, in_features // groups, self.features)
        )
        pads = explicit_padding(self.padding, x.shape[1:-1], self.kernel_size, strides, dilation)

        def conv(binary_input: Array, kernel: Array) -> Array:
            # The padding goes around the quantized input. Zeros (the default) are what the
            # conv's own padding writes; that is also the cheap way, since an explicit pad copies
            # the whole activation forward and slices its gradient backward (13 % of the 1-bit
            # FCOS step at 256 px on CPU). Another value is padded explicitly, after
            # quantization: padding before it would write sign(pad_value), never 0
            # (sign(0) = -1).
            conv_pads = pads
            if self.pad_value != 0:
                binary_input = jnp.pad(
                    binary_input, [(0, 0), *pads, (0, 0)], constant_values=self.pad_value
                )
                conv_pads = "VALID"
            return conv_general_dilated(
                binary_input,
                kernel,
                window_strides=strides,
                padding=conv_pads,
                rhs_dilation=dilation,
                dimension_numbers=channels_last_dimension_numbers(x.ndim),
                feature_group_count=groups,
            )

        return _apply_to_input(self, conv, x, binary_kernel, alpha, bias)


class BinaryDense(nn.Module):
    """1-bit dense layer: out = alpha * (q_a(x) @ sign(w)) [+ bias] on the last axis.

    Attributes are those of ``BinaryConv`` that apply to a dense layer.
    """

    features: int
    use_bias: bool = False
    input_quantizer: str | None = "approx"
    weight_quantizer: str = "clipped"
    scale: str = "learned"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array | Deferred) -> Array:
        """x: [..., c_in] (an array or a ``Deferred`` activation) -> [..., features]."""
        binary_kernel, alpha, bias = _binary_operands(self, x, (x.shape[-1], self.features))
        return _apply_to_input(self, jnp.matmul, x, binary_kernel, alpha, bias)
