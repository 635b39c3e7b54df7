"""A new run's starting weights: an ImageNet-pretrained backbone (``config.model.pretrained``)
and/or another run's checkpoint (``config.init_from``), applied before the first step.

``config.model.pretrained``: a torchvision-layout ResNet-18/34 state dict (``.safetensors``,
``.npz``, or ``.pth`` with torch installed) loaded into the backbone; see
``models/pretrained.py``. ``config.init_from``: the workdir of another run, whose latest or best
checkpoint (``config.init_from_checkpoint``) gives every parameter and BatchNorm statistic whose
path and shape match, e.g. a 1-bit detector started from a trained real one. Both may be set:
the backbone is loaded first, then the checkpoint's matching tensors replace it. Each prints a
report of what was loaded, newly initialised and skipped. A resumed run ignores both: its own
checkpoint holds everything.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from dfrdet_jax import checkpointing
from dfrdet_jax.models import pretrained


def _announce(report: pretrained.TransferReport) -> None:
    if jax.process_index() == 0:
        print(report.summary(), flush=True)
    logging.info("%s", report.summary())


def pretrained_backbone(config: ml_collections.ConfigDict, variables: dict[str, Any]):
    """``variables`` (numpy) with the backbone loaded from ``config.model.pretrained``; returns
    (variables, report)."""
    path = config.model.pretrained
    state_dict = pretrained.read_state_dict(path)
    backbone = {name: variables[name]["backbone"] for name in ("params", "batch_stats")}
    backbone, report = pretrained.load_torchvision_resnet(
        backbone,
        state_dict,
        depth=config.model.depth,
        binary="backbone" in config.model.binary_parts,
        bits=config.model.binary.bits,
        source=path,
    )
    merged = {name: {**variables[name], "backbone": backbone[name]} for name in backbone}
    return merged, report


def from_checkpoint(config: ml_collections.ConfigDict, variables: dict[str, Any]):
    """``variables`` (numpy) with the matching tensors of the checkpoint of
    ``config.init_from``; returns (variables, report)."""
    workdir = os.path.expanduser(config.init_from)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"config.init_from={workdir!r} has no checkpoints folder")
    which = config.init_from_checkpoint
    step, source = checkpointing.Checkpointer(workdir, read_only=True).restore_variables(which)
    return pretrained.transfer_matching(
        variables,
        source,
        source_name=f"{workdir} ({which} checkpoint, step {step})",
        bits=config.model.binary.bits,
    )


def apply(config: ml_collections.ConfigDict, state):
    """``state`` with its parameters and BatchNorm statistics taken from the configured starts
    (unchanged when none is set). The optimizer state is untouched: it is still the fresh one."""
    if not (config.model.pretrained or config.init_from):
        return state
    on_devices = {"params": state.params, "batch_stats": state.batch_stats}
    target = jax.tree.map(lambda x: x.sharding, on_devices)
    variables = jax.tree.map(np.asarray, on_devices)  # copied to host once for both starts
    if config.model.pretrained:
        variables, report = pretrained_backbone(config, variables)
        _announce(report)
    if config.init_from:
        variables, report = from_checkpoint(config, variables)
        _announce(report)
    variables = jax.device_put(variables, target)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
