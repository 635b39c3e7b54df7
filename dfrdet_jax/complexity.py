"""Model size and operations, counted as the paper counts them (its Tables 2 and 3).

  size (MB)  = (32 x real-valued parameters + 1 x binary weights + k x k-bit weights) / 8 / 10^6
               (BiDet's memory)
  OPs        = real multiply-accumulates + binary multiply-accumulates / 64   (Bi-Real-Net)
               + k-bit multiply-accumulates x k / 32

for one image of the given size through the inference network: the training-only DFR decoder
and the post-processing (decoding, NMS) are not part of it. Operations are those of the
convolution and dense layers (normalisation, activations and additions are not counted, as in
Bi-Real-Net); a layer called several times (FCOS's head, shared over the pyramid levels) counts
each call, its parameters once, and Faster R-CNN's box head counts once per proposal it
classifies (``faster_rcnn.rpn_post_nms_top_k_test``: 1,000). A binary multiply-accumulate is
one of a BinaryConv/BinaryDense whose input is binarized too (XNOR + popcount); a 1-bit kernel
applied to a real-valued input counts as real. A k-bit one (2 <= k <= 8) is one of an
LSQConv/LSQDense, whose input is always quantized: k / 32 of a real one, the 1/8 for k = 4 that
reproduces the paper's LSQ 4-bit rows (Table 2; e.g. FCOS's 55.88 G OPs from its real and 1-bit
counts; other k are not in the paper). Every parameter that is not a 1-bit or k-bit kernel
(BatchNorm, scales alpha, LSQ steps, biases, PReLU slopes) counts as 32-bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import traverse_util

from dfrdet_jax import layers

_BINARY_LAYERS = (layers.BinaryConv, layers.BinaryDense)
_KBIT_LAYERS = (layers.LSQConv, layers.LSQDense)
_COUNTED_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, *_BINARY_LAYERS, *_KBIT_LAYERS)


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Parameter and multiply-accumulate counts of one inference pass of one image."""

    real_params: int
    binary_params: int
    real_macs: int
    binary_macs: int
    kbit_params: dict[int, int] = dataclasses.field(default_factory=dict)  # by bit width k
    kbit_macs: dict[int, int] = dataclasses.field(default_factory=dict)  # by bit width k

    @property
    def size_mb(self) -> float:
        """Storage in MB (10^6 bytes): 32 bits per real parameter, 1 per binary weight, k per
        k-bit weight."""
        kbit = sum(k * n for k, n in self.kbit_params.items())
        return (32 * self.real_params + self.binary_params + kbit) / 8 / 1e6

    @property
    def ops(self) -> float:
        """Real multiply-accumulates plus 1/64 of the binary ones and k/32 of the k-bit ones."""
        kbit = sum(k / 32 * n for k, n in self.kbit_macs.items())
        return self.real_macs + self.binary_macs / 64 + kbit

    def summary(self) -> dict[str, float]:
        """Sizes, OPs and counts; '<k>bit_params' and '<k>bit_macs_g' for each k-bit width."""
        summary = {
            "size_mb": self.size_mb,
            "ops_g": self.ops / 1e9,
            "real_params": self.real_params,
            "binary_params": self.binary_params,
            "real_macs_g": self.real_macs / 1e9,
            "binary_macs_g": self.binary_macs / 1e9,
        }
        for k in sorted(self.kbit_params):
            summary[f"{k}bit_params"] = self.kbit_params[k]
            summary[f"{k}bit_macs_g"] = self.kbit_macs.get(k, 0) / 1e9
        return summary


def _binary_input(module: nn.Module) -> bool:
    return module.input_quantizer not in (None, "none")


def _binary_weights(module: nn.Module) -> bool:
    """False for a binary layer kept real for staged training (weight_quantizer 'none')."""
    return isinstance(module, _BINARY_LAYERS) and module.weight_quantizer not in (None, "none")


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """What one abstract inference pass saw: multiply-accumulates, the 1-bit kernels (their
    parameter paths and the scale mode of their layer), the k-bit kernels (paths and bit width
    k) and the parameter shapes."""

    real_macs: int
    binary_macs: int
    binary_kernels: dict[tuple[str, ...], str]
    params: dict[tuple[str, ...], Any]
    kbit_kernels: dict[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
    kbit_macs: dict[int, int] = dataclasses.field(default_factory=dict)

    def complexity(self) -> Complexity:
        binary = sum(leaf.size for path, leaf in self.params.items() if path in self.binary_kernels)
        kbit = {}
        for path, k in self.kbit_kernels.items():
            kbit[k] = kbit.get(k, 0) + self.params[path].size
        real = sum(leaf.size for leaf in self.params.values()) - binary - sum(kbit.values())
        return Complexity(real, binary, self.real_macs, self.binary_macs, kbit, self.kbit_macs)


def trace_layers(model: nn.Module, image_hw: tuple[int, int], **call_kwargs: Any) -> LayerTrace:
    """Traces ``model`` on one [1, h, w, 3] image with ``call_kwargs`` (e.g. train=False).

    Nothing is computed: the model is traced abstractly (jax.eval_shape), so a full-size
    network at 800 x 800 px costs a second of tracing, not a forward pass.
    """
    real_macs, binary_macs, binary_kernels, kbit_kernels, kbit_macs = 0, 0, {}, {}, {}

    def interceptor(next_fun, args, kwargs, context):
        nonlocal real_macs, binary_macs
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _COUNTED_LAYERS):
            kernel = module.get_variable("params", "kernel")
            # The trace holds one image, so every element is that image's, whatever the leading
            # axis holds: the batch, or the box head's RoIs (its MACs scale with them).
            if isinstance(module, nn.ConvTranspose):
                # Every input pixel meets every tap: in pixels x kh * kw * c_in * c_out.
                macs = args[0].size // args[0].shape[-1] * kernel.size
            else:  # per output element, the fan-in (kh * kw * c_in / groups, or c_in)
                macs = out.size * (kernel.size // kernel.shape[-1])
            if isinstance(module, _KBIT_LAYERS):
                kbit_kernels[(*module.path, "kernel")] = module.bits
                kbit_macs[module.bits] = kbit_macs.get(module.bits, 0) + macs
                return out
            if _binary_weights(module):
                binary_kernels[(*module.path, "kernel")] = module.scale
                if _binary_input(module):
                    binary_macs += macs
                    return out
            real_macs += macs
        return out

    image = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    init = functools.partial(model.init, **call_kwargs)
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(init, jax.random.key(0), image)
    params = traverse_util.flatten_dict(variables["params"])
    return LayerTrace(real_macs, binary_macs, binary_kernels, params, kbit_kernels, kbit_macs)


def count(model: nn.Module, image_hw: tuple[int, int], **call_kwargs: Any) -> Complexity:
    """Counts ``model`` called on one [1, h, w, 3] image with ``call_kwargs`` (e.g. train=False);
    see ``trace_layers``."""
    return trace_layers(model, image_hw, **call_kwargs).complexity()


def model_complexity(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
    """Size and OPs of the config's detector at ``config.data.image_size`` (square), logged and,
    with a workdir, written to ``workdir/complexity.json``."""
    from dfrdet_jax import data  # pylint: disable=g-import-not-at-top
    from dfrdet_jax.models import registry  # pylint: disable=g-import-not-at-top

    num_classes = data.dataset_info(config.data).num_classes
    model = registry.build_model(config, num_classes=num_classes)
    size = config.data.image_size
    counted = count(model, (size, size), train=False)
    result = counted.summary()
    result.update(
        model=config.model.name, variant=config.variant, image_size=size, num_classes=num_classes
    )
    kbit = "".join(f" + {n / 1e9:.2f} G {k}-bit" for k, n in sorted(counted.kbit_macs.items()))
    logging.info(
        "%s (%s) at %d x %d px: %.2f MB, %.2f G OPs (%.2f G real + %.2f G binary%s MACs)",
        config.model.name,
        config.variant,
        size,
        size,
        result["size_mb"],
        result["ops_g"],
        result["real_macs_g"],
        result["binary_macs_g"],
        kbit,
    )
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "complexity.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result
