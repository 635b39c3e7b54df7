"""Bit-packed export of a trained detector for deployment (``--mode export``).

The inference network only: the DFR decoder is training-only and left out, and so is the
optimizer state. Every 1-bit kernel (a ``BinaryConv``/``BinaryDense`` weight, found by tracing
inference as ``complexity`` does) is stored as its signs, 8 per byte (``np.packbits``; bit 1 means
+1, i.e. w > 0: sign(0) = -1 as everywhere in dfrdet_jax, after the paper); for the ``mean`` scale
mode its per-channel mean|w| is stored beside it, as the layer computes it from the latent weights;
for the ``learned`` mode its ``alpha`` is stored as the layer applies it, |alpha| (positive), so
that a runtime reads the scale directly. Every k-bit kernel (an ``LSQConv``/``LSQDense`` weight) is
stored as its integer codes q = round(clip(w / s_w, q_min, q_max)), k bits each (q - q_min, bit
planes packed by ``np.packbits``), beside its float32 steps. Every other parameter and BatchNorm
statistic stays float32. The files, in ``workdir/export``:

  model.npz      arrays by '/'-joined path: 'params/...', 'batch_stats/...', a packed 1-bit kernel
                 as '<path>:bits' (uint8) and, for scale 'mean', '<path>:mean_abs' (float32
                 [c_out]); a packed k-bit kernel as '<path>:codes' (uint8)
  manifest.json  detector, variant, classes, input size, the packed kernels (path, shape and
                 scale, or shape and bits for k-bit ones) and the sizes
  config.json    the run's config, from which ``dfrdet_jax.predict`` rebuilds the network
                 (``python -m dfrdet_jax.predict --export DIR --input IMAGES``: no workdir, no
                 checkpoint, no config file needed)

``load_export(directory)`` rebuilds variables that give the checkpoint's detections exactly:
a packed 1-bit kernel comes back as +-1 (scaled by its mean|w| for the ``mean`` mode), which
every binary layer maps to the same sign(w) and scale alpha as the latent weights did (a zero
weight comes back as -1, its sign; an all-zero channel of the ``mean`` mode as zeros, whose sign
is again -1); a k-bit
kernel as q * s_w, which its layer quantizes back to the same q.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from dfrdet_jax import checkpointing, complexity, layers

BITS_SUFFIX = ":bits"
MEAN_ABS_SUFFIX = ":mean_abs"
CODES_SUFFIX = ":codes"
WEIGHT_STEP = "weight_step"  # the per-output-channel step beside an LSQ layer's kernel
TRAINING_ONLY = ("decoder",)  # top-level parameter scopes not needed for inference
CONFIG_FILE = "config.json"


def _pack_codes(kernel: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    """The k-bit codes of an LSQ kernel [..., c_out] with steps [c_out], k bits each, packed."""
    q_min, q_max = layers.lsq_levels(bits, signed=True)
    q = np.round(np.clip(kernel / step, q_min, q_max))  # as lsq_quantize, in float32
    codes = (q - q_min).astype(np.uint8).reshape(-1, 1)
    return np.packbits(np.unpackbits(codes, axis=1)[:, 8 - bits :])


def _unpack_codes(packed: np.ndarray, step: np.ndarray, shape: list[int], bits: int):
    """Inverse of ``_pack_codes``: the de-quantized kernel q * step, float32 ``shape``."""
    q_min, _ = layers.lsq_levels(bits, signed=True)
    size = int(np.prod(shape))
    planes = np.unpackbits(packed)[: size * bits].reshape(size, bits)
    codes = np.packbits(np.pad(planes, ((0, 0), (8 - bits, 0))), axis=1)[:, 0]
    q = codes.astype(np.float32) + q_min
    return q.reshape(shape) * step


def _is_learned_alpha(path: tuple[str, ...], binary_kernels: dict[tuple[str, ...], str]) -> bool:
    """Whether ``path`` is the learned ``alpha`` beside a packed 1-bit kernel."""
    kernel = (*path[:-1], "kernel")
    return path[-1] == "alpha" and binary_kernels.get(kernel) == "learned"


def pack_variables(
    variables: dict[str, Any],
    binary_kernels: dict[tuple[str, ...], str],
    kbit_kernels: dict[tuple[str, ...], int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays for model.npz, {'/'-joined kernel path: {'shape', 'scale'} or {'shape', 'bits'}})
    of inference variables.

    variables: {'params': ..., 'batch_stats': ...} (nested dicts of arrays).
    binary_kernels: parameter path (without 'params') -> scale mode, ``trace_layers``'s.
    kbit_kernels: parameter path -> bit width of the LSQ kernels, ``trace_layers``'s.
    """
    arrays, packed = {}, {}
    kbit_kernels = kbit_kernels or {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(jax.device_get(variables.get(collection, {})))
        for path, value in flat.items():
            if path[0] in TRAINING_ONLY:
                continue
            value = np.asarray(value, np.float32)
            name = "/".join((collection, *path))
            bits = kbit_kernels.get(path) if collection == "params" else None
            if bits is not None:
                step = np.asarray(flat[(*path[:-1], WEIGHT_STEP)], np.float32)
                arrays[name + CODES_SUFFIX] = _pack_codes(value, step, bits)
                packed[name] = {"shape": list(value.shape), "bits": bits}
                continue
            scale = binary_kernels.get(path) if collection == "params" else None
            if scale is None:
                if collection == "params" and _is_learned_alpha(path, binary_kernels):
                    value = np.abs(value)  # the scale the layer applies (BinaryConv: |alpha|)
                arrays[name] = value
                continue
            # Bit 1 for w > 0: the library's sign (layers.sign: -1 for w <= 0).
            arrays[name + BITS_SUFFIX] = np.packbits(value.reshape(-1) > 0)
            if scale == "mean":
                reduce_axes = tuple(range(value.ndim - 1))
                arrays[name + MEAN_ABS_SUFFIX] = np.abs(value).mean(axis=reduce_axes)
            packed[name] = {"shape": list(value.shape), "scale": scale}
    return arrays, packed


def unpack_variables(arrays: dict[str, np.ndarray], packed: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``pack_variables`` up to what inference reads: nested {'params', 'batch_stats'}
    with every packed 1-bit kernel as +-1 float32 (times its mean|w| for scale 'mean') and every
    k-bit one as its codes times its steps."""
    flat = {}
    for name, value in arrays.items():
        if name.endswith(MEAN_ABS_SUFFIX):
            continue
        if name.endswith(CODES_SUFFIX):
            name = name[: -len(CODES_SUFFIX)]
            step = arrays[name.rsplit("/", 1)[0] + "/" + WEIGHT_STEP]
            value = _unpack_codes(value, step, packed[name]["shape"], packed[name]["bits"])
        elif name.endswith(BITS_SUFFIX):
            name = name[: -len(BITS_SUFFIX)]
            info = packed[name]
            size = int(np.prod(info["shape"]))
            signs = np.unpackbits(value)[:size].astype(np.float32) * 2 - 1
            value = signs.reshape(info["shape"])
            if info["scale"] == "mean":
                value = value * arrays[name + MEAN_ABS_SUFFIX]
        flat[tuple(name.split("/"))] = value
    return traverse_util.unflatten_dict(flat)


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The ``export`` mode: packs the latest checkpoint of ``workdir`` into ``workdir/export``;
    returns that folder."""
    from dfrdet_jax import evaluate  # pylint: disable=g-import-not-at-top
    from dfrdet_jax.models import registry  # pylint: disable=g-import-not-at-top

    registry.validate_config(config)
    model, state, _, info = evaluate.restored_state(config, workdir)
    size = config.data.image_size
    trace = complexity.trace_layers(model, (size, size), train=False)
    arrays, packed = pack_variables(
        {"params": state.params, "batch_stats": state.batch_stats},
        trace.binary_kernels,
        trace.kbit_kernels,
    )
    out_dir = os.path.join(workdir, "export")
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "model.npz")
    np.savez(model_path, **arrays)
    counted = trace.complexity()
    manifest = {
        "model": config.model.name,
        "variant": config.variant,
        "step": int(state.step),
        "image_size": size,
        "num_classes": info.num_classes,
        "class_names": info.class_names,
        "category_ids": info.category_ids,
        "packed_kernels": packed,
        "file_bytes": os.path.getsize(model_path),
        "size_mb": counted.size_mb,  # 32 bits per real parameter, 1 per binary weight, k per k-bit
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:  # what rebuilds the network
        f.write(config.to_json_best_effort(indent=1))
    logging.info(
        "Exported step %d of %s (%s) to %s: %d packed kernels, %.2f MB on disk (%.2f MB counted "
        "as the paper counts)",
        manifest["step"],
        config.model.name,
        config.variant,
        out_dir,
        len(packed),
        manifest["file_bytes"] / 1e6,
        counted.size_mb,
    )
    return out_dir


def load_export_config(directory: str) -> ml_collections.ConfigDict:
    """The config of the exported run (``config.json`` of the export), as a ConfigDict."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not an export folder, or predates configs "
            "in exports; export again with --mode export"
        )
    with open(path) as f:
        return checkpointing.config_from_json(json.load(f))


def load_export(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables for ``model.apply(variables, images, train=False)``, manifest) of an export."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(directory, "model.npz")) as data:
        arrays = {name: data[name] for name in data.files}
    return unpack_variables(arrays, manifest["packed_kernels"]), manifest
