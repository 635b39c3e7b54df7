"""Importable 1-bit (and k-bit LSQ) building blocks for any Flax model.

Example::

  import flax.linen as nn
  from dfrdet_jax import layers

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = layers.BinaryConv(64, (3, 3), input_quantizer="approx", scale="learned")(x)
      return layers.RPReLU()(nn.BatchNorm(use_running_average=True)(y)) + x

  y, state = Block().apply(variables, x, mutable=["losses"])
  loss = task_loss + gamma * layers.total_reconstruction_loss(state["losses"])
"""

from dfrdet_jax.layers.activations import Deferred, LearnableBias, RPReLU, computed, prelu
from dfrdet_jax.layers.binary import (
    LOSSES_COLLECTION,
    RECONSTRUCTION_LOSS_NAME,
    SCALE_MODES,
    BinaryConv,
    BinaryDense,
    binarize_with_reconstruction,
    reconstruction_loss,
    total_reconstruction_loss,
)
from dfrdet_jax.layers.conv import Conv, conv_general_dilated, explicit_padding
from dfrdet_jax.layers.lsq import LSQConv, LSQDense, initial_input_step
from dfrdet_jax.layers.norm import GroupNorm, group_norm
from dfrdet_jax.layers.pool import max_pool
from dfrdet_jax.layers.quantizers import (
    BINARY_QUANTIZERS,
    apply_to_sign,
    get_binary_quantizer,
    lsq_init_step,
    lsq_levels,
    lsq_quantize,
    round_ste,
    scale_gradient,
    sign,
    sign_approx_ste,
    sign_clipped_ste,
    sign_identity_ste,
)

__all__ = [
    "BINARY_QUANTIZERS",
    "LOSSES_COLLECTION",
    "RECONSTRUCTION_LOSS_NAME",
    "SCALE_MODES",
    "BinaryConv",
    "BinaryDense",
    "Conv",
    "Deferred",
    "GroupNorm",
    "LSQConv",
    "LSQDense",
    "LearnableBias",
    "RPReLU",
    "apply_to_sign",
    "binarize_with_reconstruction",
    "computed",
    "conv_general_dilated",
    "explicit_padding",
    "get_binary_quantizer",
    "group_norm",
    "initial_input_step",
    "lsq_init_step",
    "lsq_levels",
    "lsq_quantize",
    "max_pool",
    "prelu",
    "reconstruction_loss",
    "round_ste",
    "scale_gradient",
    "sign",
    "sign_approx_ste",
    "sign_clipped_ste",
    "sign_identity_ste",
    "total_reconstruction_loss",
]
