"""Starting weights: torchvision ResNet-18/34 state dicts mapped onto the backbone, and parameter
transfer between two detectors (e.g. a trained real-valued one into a 1-bit one).

A state dict is a flat {name: array} in torchvision's names and PyTorch's layouts (conv kernels
[out, in, kh, kw]); ``read_state_dict`` reads it from ``.safetensors`` or ``.npz`` with numpy
alone. ``load_torchvision_resnet`` maps it onto ``params['backbone']`` / ``batch_stats['backbone']``
of ``models.resnet.ResNet``, real or 1-bit:

  conv1, bn1                          -> stem_conv, stem_norm
  layer{s}.{b}.conv{u}, .bn{u}        -> stage{s}_block{b+1}/unit{u}/conv, /norm
  layer{s}.0.downsample.0, .1         -> real: stage{s}_block1/shortcut_conv, /shortcut_norm
                                         1-bit: stage{s}_block1/unit1/shortcut_conv, /shortcut_norm

In a 1-bit backbone the real kernels become the latent weights and every learned scale alpha
starts from them (mean |w| per output channel, the minimiser of L_R), as the DFR-Det paper
starts from ImageNet weights; in a k-bit (LSQ) one every weight step starts from them by LSQ's
rule (``DERIVED_FROM_KERNEL``). The learnable biases, PReLUs and LSQ input steps a quantized unit
adds keep their initial values. The classifier (fc.*) and BatchNorm's num_batches_tracked are
skipped. A name the mapping does not know, a missing tensor or a shape that differs is an error
naming it: nothing is skipped silently. Every transfer returns a ``TransferReport`` of what was
loaded, what was newly initialised and what was skipped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import traverse_util

from dfrdet_jax import layers
from dfrdet_jax.choices import check_choice
from dfrdet_jax.models.resnet import STAGE_BLOCKS

SAFETENSORS_CONVERSION = (
    'python -c "import torch, safetensors.numpy as st; '
    "sd = torch.load('{path}', map_location='cpu'); "
    "st.save_file({{k: v.numpy() for k, v in sd.items()}}, '{stem}.safetensors')\""
)
# Unused parts of a torchvision ResNet: its classifier and BatchNorm's step counters.
SKIPPED_SUFFIXES = ("num_batches_tracked",)
SKIPPED_PREFIXES = ("fc.",)
# Parameters a quantized unit has and a real ResNet does not, initialised: RSign's bias and the
# (R)PReLU (modules), an LSQ layer's input step (a parameter of its conv).
BINARY_ONLY_MODULES = ("bias", "act")
BINARY_ONLY_PARAMS = ("input_step",)


def _lsq_weight_step(kernel: np.ndarray, bits: int) -> np.ndarray:
    if bits < 2:
        raise ValueError(
            "An LSQ weight_step is derived from its kernel with the bit width: pass bits=2-8 "
            f"(config.model.binary.bits), got {bits}"
        )
    channel_axes = tuple(range(kernel.ndim - 1))
    return np.asarray(layers.lsq_init_step(kernel, bits, axis=channel_axes))


# Parameters set from the kernel beside them when that kernel is loaded and they are not:
# name -> (kernel [..., c_out] float32, bits of the layer) -> value [c_out].
DERIVED_FROM_KERNEL: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    # a 1-bit layer's learned scale: mean |w| per output channel, the minimiser of L_R
    "alpha": lambda w, bits: np.mean(np.abs(w), axis=tuple(range(w.ndim - 1))),
    # an LSQ layer's weight step: LSQ's initialisation, 2 mean |w| / sqrt(q_max) per channel
    "weight_step": _lsq_weight_step,
}


@dataclasses.dataclass
class TransferReport:
    """What a transfer did, as '/'-joined parameter paths (collection first)."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    # alphas and weight steps (DERIVED_FROM_KERNEL) from their loaded kernels
    derived: list[str] = dataclasses.field(default_factory=list)
    initialised: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # in the source, not used

    def summary(self) -> str:
        """Counts, then every derived, initialised and skipped name (loaded ones are counted)."""
        lines = [
            f"Weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.derived)} scales derived from loaded kernels, {len(self.initialised)} "
            f"newly initialised, {len(self.skipped)} skipped"
        ]
        for title, names in (
            ("derived", self.derived),
            ("newly initialised", self.initialised),
            ("skipped", self.skipped),
        ):
            if names:
                lines.append(f"  {title}: " + ", ".join(names))
        return "\n".join(lines)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a ``.safetensors`` or ``.npz`` file (numpy only), or of a PyTorch
    ``.pth`` / ``.pt`` file when torch is installed (otherwise an error giving the conversion)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained weights {path} do not exist")
    stem, ext = os.path.splitext(path)
    if ext == ".safetensors":
        import safetensors.numpy  # pylint: disable=g-import-not-at-top

        return dict(safetensors.numpy.load_file(path))
    if ext == ".npz":
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    if ext in (".pth", ".pt"):
        try:
            import torch  # pylint: disable=g-import-not-at-top
        except ImportError:
            raise ValueError(
                f"{path} is a PyTorch file and torch is not installed; convert it once where "
                "torch is:\n  " + SAFETENSORS_CONVERSION.format(path=path, stem=stem)
            ) from None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {name: value.numpy() for name, value in state.get("state_dict", state).items()}
    raise ValueError(
        f"Pretrained weights {path}: unknown format {ext!r}; use .safetensors, .npz or .pth"
    )


def _torch_to_flax(name: str, value: np.ndarray) -> np.ndarray:
    """A torchvision tensor in flax's layout: conv kernels [O, I, kh, kw] -> [kh, kw, I, O]."""
    if name.endswith(".weight") and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    return value


def _norm_entries(torch_prefix: str, flax_path: str) -> list[tuple[str, str]]:
    return [
        (f"{torch_prefix}.weight", f"params/{flax_path}/scale"),
        (f"{torch_prefix}.bias", f"params/{flax_path}/bias"),
        (f"{torch_prefix}.running_mean", f"batch_stats/{flax_path}/mean"),
        (f"{torch_prefix}.running_var", f"batch_stats/{flax_path}/var"),
    ]


def torchvision_resnet_names(depth: int, binary: bool) -> list[tuple[str, str]]:
    """(torchvision name, 'collection/flax/path') of every tensor of a ResNet-``depth`` backbone
    (paths relative to the backbone module)."""
    check_choice("ResNet depth", depth, sorted(STAGE_BLOCKS))
    entries = [("conv1.weight", "params/stem_conv/kernel"), *_norm_entries("bn1", "stem_norm")]
    for stage, num_blocks in enumerate(STAGE_BLOCKS[depth], start=1):
        for block in range(num_blocks):
            ours = f"stage{stage}_block{block + 1}"
            theirs = f"layer{stage}.{block}"
            for unit in (1, 2):
                kernel = f"params/{ours}/unit{unit}/conv/kernel"
                entries.append((f"{theirs}.conv{unit}.weight", kernel))
                entries += _norm_entries(f"{theirs}.bn{unit}", f"{ours}/unit{unit}/norm")
            if stage > 1 and block == 0:
                shortcut = f"{ours}/unit1" if binary else ours
                entries.append(
                    (f"{theirs}.downsample.0.weight", f"params/{shortcut}/shortcut_conv/kernel")
                )
                entries += _norm_entries(f"{theirs}.downsample.1", f"{shortcut}/shortcut_norm")
    return entries


def _flat(variables: dict[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(variables, sep="/")


def _derive_from_kernels(flat: dict[str, Any], report: TransferReport, bits: int) -> None:
    """Sets every parameter of ``DERIVED_FROM_KERNEL`` whose kernel was loaded (and it was not)
    from that kernel; ``bits``: the quantized layers' bit width (1: binary)."""
    loaded = set(report.loaded)
    for path in list(flat):
        module, name = path.rsplit("/", 1)
        kernel = f"{module}/kernel"
        if name in DERIVED_FROM_KERNEL and kernel in loaded and path not in loaded:
            value = DERIVED_FROM_KERNEL[name](np.asarray(flat[kernel], np.float32), bits)
            flat[path] = value.astype(np.asarray(flat[path]).dtype)
            report.derived.append(path)


def load_torchvision_resnet(
    variables: dict[str, Any],
    state_dict: dict[str, np.ndarray],
    *,
    depth: int,
    binary: bool,
    bits: int = 1,
    source: str = "state dict",
) -> tuple[dict[str, Any], TransferReport]:
    """Backbone variables ({'params': ..., 'batch_stats': ...} of a ``ResNet``) with the tensors
    of a torchvision ResNet state dict; returns (new variables, report). ``binary``: the backbone
    has the quantized units' topology, of ``bits``-bit layers (1: binary, 2-8: LSQ).

    Raises ValueError naming the tensor for a missing or unknown name or a shape mismatch (a
    ``backbone_width`` other than 64 shows up as one)."""
    flat = _flat(variables)
    report = TransferReport(source)
    names = torchvision_resnet_names(depth, binary)
    known = {theirs for theirs, _ in names}
    for name in sorted(state_dict):
        if name in known:
            continue
        if name.startswith(SKIPPED_PREFIXES) or name.endswith(SKIPPED_SUFFIXES):
            report.skipped.append(name)
        else:
            raise ValueError(
                f"{source}: {name!r} is not a tensor of torchvision's ResNet-{depth}; is this "
                "the right file and config.model.depth?"
            )
    for theirs, ours in names:
        if theirs not in state_dict:
            raise ValueError(f"{source} has no {theirs!r} (for backbone/{ours})")
        if ours not in flat:
            raise ValueError(f"The backbone has no {ours} (for {theirs!r} of {source})")
        value = _torch_to_flax(theirs, np.asarray(state_dict[theirs]))
        target = np.asarray(flat[ours])
        if value.shape != target.shape:
            raise ValueError(
                f"{source}: {theirs!r} has shape {value.shape} in flax layout, backbone/{ours} "
                f"has {target.shape} (config.model.backbone_width must be 64 for ImageNet weights)"
            )
        flat[ours] = value.astype(target.dtype)
        report.loaded.append(ours)
    _derive_from_kernels(flat, report, bits)
    done = set(report.loaded) | set(report.derived)
    for path in flat:
        if path in done:
            continue
        module, name = path.split("/")[-2:]
        if not binary or (module not in BINARY_ONLY_MODULES and name not in BINARY_ONLY_PARAMS):
            raise ValueError(f"backbone/{path} has no counterpart in {source}")
        report.initialised.append(path)
    return traverse_util.unflatten_dict(flat, sep="/"), report


def transfer_matching(
    target: dict[str, Any], source: dict[str, Any], *, source_name: str, bits: int = 1
) -> tuple[dict[str, Any], TransferReport]:
    """``target`` variables with every tensor of ``source`` whose path and shape match copied in
    (e.g. a trained real detector into a 1-bit one); the learned alphas and LSQ weight steps of
    copied kernels are derived from them (``bits``: the target's quantized bit width, 1: binary).
    Returns (new variables, report); nothing is required to match."""
    flat_target, flat_source = _flat(target), _flat(source)
    report = TransferReport(source_name)
    for path, value in flat_source.items():
        value = np.asarray(value)
        if path in flat_target and value.shape == np.shape(flat_target[path]):
            flat_target[path] = value.astype(np.asarray(flat_target[path]).dtype)
            report.loaded.append(path)
        else:
            why = "no such parameter" if path not in flat_target else f"shape {value.shape}"
            report.skipped.append(f"{path} ({why})")
    _derive_from_kernels(flat_target, report, bits)
    done = set(report.loaded) | set(report.derived)
    report.initialised = [path for path in flat_target if path not in done]
    return traverse_util.unflatten_dict(flat_target, sep="/"), report
