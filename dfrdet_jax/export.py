"""Bit-packed export of a trained detector for deployment (``--mode export``).

The inference network only: the DFR decoder is training-only and left out, and so is the
optimizer state. Every 1-bit kernel (a ``BinaryConv``/``BinaryDense`` weight, found by tracing
inference as ``complexity`` does) is stored as its signs, 8 per byte (``np.packbits``; bit 1 means
+1, sign(0) = +1 as everywhere in dfrdet_jax); for the ``mean`` scale mode its per-channel
mean|w| is stored beside it, as the layer computes it from the latent weights. Every other
parameter and BatchNorm statistic stays float32. The files, in ``workdir/export``:

  model.npz      arrays by '/'-joined path: 'params/...', 'batch_stats/...', a packed kernel as
                 '<path>:bits' (uint8) and, for scale 'mean', '<path>:mean_abs' (float32 [c_out])
  manifest.json  detector, variant, classes, input size, the packed kernels (path, shape, scale)
                 and the sizes

``load_export(directory)`` rebuilds variables that give the checkpoint's detections exactly:
a packed kernel comes back as +-1 (scaled by its mean|w| for the ``mean`` mode), which every
binary layer maps to the same sign(w) and scale alpha as the latent weights did.
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

from dfrdet_jax import complexity

BITS_SUFFIX = ":bits"
MEAN_ABS_SUFFIX = ":mean_abs"
TRAINING_ONLY = ("decoder",)  # top-level parameter scopes not needed for inference


def pack_variables(
    variables: dict[str, Any], binary_kernels: dict[tuple[str, ...], str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays for model.npz, {'/'-joined kernel path: {'shape', 'scale'}}) of inference variables.

    variables: {'params': ..., 'batch_stats': ...} (nested dicts of arrays).
    binary_kernels: parameter path (without 'params') -> scale mode, ``trace_layers``'s.
    """
    arrays, packed = {}, {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(jax.device_get(variables.get(collection, {})))
        for path, value in flat.items():
            if path[0] in TRAINING_ONLY:
                continue
            value = np.asarray(value, np.float32)
            name = "/".join((collection, *path))
            scale = binary_kernels.get(path) if collection == "params" else None
            if scale is None:
                arrays[name] = value
                continue
            arrays[name + BITS_SUFFIX] = np.packbits(value.reshape(-1) >= 0)
            if scale == "mean":
                reduce_axes = tuple(range(value.ndim - 1))
                arrays[name + MEAN_ABS_SUFFIX] = np.abs(value).mean(axis=reduce_axes)
            packed[name] = {"shape": list(value.shape), "scale": scale}
    return arrays, packed


def unpack_variables(arrays: dict[str, np.ndarray], packed: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``pack_variables`` up to what inference reads: nested {'params', 'batch_stats'}
    with every packed kernel as +-1 float32 (times its mean|w| for scale 'mean')."""
    flat = {}
    for name, value in arrays.items():
        if name.endswith(MEAN_ABS_SUFFIX):
            continue
        if name.endswith(BITS_SUFFIX):
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
        {"params": state.params, "batch_stats": state.batch_stats}, trace.binary_kernels
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
        "size_mb": counted.size_mb,  # 32 bits per real parameter + 1 per binary weight
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
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


def load_export(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables for ``model.apply(variables, images, train=False)``, manifest) of an export."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(directory, "model.npz")) as data:
        arrays = {name: data[name] for name in data.files}
    return unpack_variables(arrays, manifest["packed_kernels"]), manifest
