"""The size of a run's features, checkpoint by checkpoint: the RMS, mean |x| and largest |x| of
every FPN level, of each DFR decoder stage's output and of the reconstruction, and of the
branch that the head's first units add to the FPN level they read (each tower's first unit in
FCOS and RetinaNet, the RPN conv in Faster R-CNN), from
the forward pass (inference mode: BatchNorm's running statistics) on the batches of a split.

It finds where a run blew up (the first module whose output jumps between two checkpoints) and
compares the features of two runs (which levels DFR changes):

    python benchmarks/activation_scales.py --workdir runs/replay --steps 528,529
    python benchmarks/activation_scales.py --workdir WORKDIR --batches 8 --out scales.json

The run's config is read from its workdir; ``--steps`` are checkpoints under its
``checkpoints/`` (default: the latest). Prints a markdown table; ``--out`` writes the rows as
JSON.
"""

from __future__ import annotations

import argparse
import functools

import flax
import jax
import jax.numpy as jnp
import loss_gradients  # noqa: E402  (benchmarks/ is the script's folder)
import numpy as np

from dfrdet_jax import checkpointing, layers
from dfrdet_jax.models import registry
from dfrdet_jax.models.detectors import DECODER, NECK, normalize_images

# The head's units that read the FPN levels (FCOS's and RetinaNet's towers, Faster R-CNN's RPN):
# their normalised conv output is the branch that a 1-bit unit adds to its input, the level
# (models/common.py, ConvUnit).
_HEAD, _FIRST_UNITS = "head", ("cls_tower0", "reg_tower0", "rpn_conv0")


def _tracked(module, method_name: str) -> bool:
    """The FPN's output, each of the decoder's direct submodules' outputs and the norm of each
    of the head's first units ('norm', or one 'norm_level{i}' per level with
    ``model.head_level_norms``)."""
    path = module.path
    return method_name == "__call__" and (
        path == (NECK,)
        or (len(path) == 2 and path[0] == DECODER)
        or (
            len(path) >= 3
            and path[0] == _HEAD
            and path[-2] in _FIRST_UNITS
            and (path[-1] == "norm" or path[-1].startswith("norm_level"))
        )
    )


def feature_outputs(config, model, variables, batch) -> dict[str, jax.Array]:
    """{name: output} of one batch: 'P2'.. of the FPN, 'head/<tower>0/norm' (FCOS, RetinaNet)
    or 'head/rpn/rpn_conv0/norm' (Faster R-CNN; every level's, flattened into one; with
    ``model.head_level_norms`` one '.../norm_level{i}' per level),
    'decoder/<stage>' and 'reconstruction' (the last two only for a config with a DFR
    decoder)."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    reconstruct = bool(config.dfr.levels)
    outputs, state = model.apply(
        variables,
        normalize_images(batch["image"]),
        train=False,
        reconstruct=reconstruct,
        capture_intermediates=_tracked,
        mutable=["intermediates"],
        **registry.apply_kwargs(config, batch, train=False, rng=jax.random.key(0)),
    )
    captured = state["intermediates"]
    # A 1-bit FPN hands its levels to 1-bit towers deferred (FPN.defer_outputs): compute them.
    found = {name: layers.computed(x) for name, x in captured[NECK]["__call__"][0].items()}
    for path, calls in flax.traverse_util.flatten_dict(captured.get(_HEAD, {})).items():
        # One call per level, shared weights: the levels' outputs, flattened, as one.
        name = "/".join((_HEAD, *path[:-1]))  # path ends with '__call__'
        found[name] = jnp.concatenate([c.reshape(-1) for c in calls])
    if reconstruct:
        for stage, calls in captured[DECODER].items():
            found[f"{DECODER}/{stage}"] = calls["__call__"][0]
        found["reconstruction"] = outputs["reconstruction"]
    return found


def compiled_feature_outputs(config, model):
    """``feature_outputs`` of ``config``'s ``model``, compiled once: (variables, batch) ->
    {name: output}."""
    return jax.jit(functools.partial(feature_outputs, config, model))


def scales(config, model, variables, batches) -> dict[str, dict[str, float]]:
    """{output name: {'rms', 'mean_abs', 'max_abs'}} over every element of ``batches``."""
    parts: dict[str, list[tuple[float, float, float, int]]] = {}
    outputs_of = compiled_feature_outputs(config, model)
    for batch in batches:
        for name, x in outputs_of(variables, batch).items():
            magnitude = np.abs(np.asarray(x, np.float64))
            parts.setdefault(name, []).append(
                (np.sum(magnitude**2), np.sum(magnitude), np.max(magnitude), magnitude.size)
            )
    if not parts:
        raise ValueError("no batches: the split is empty or --batches is 0")
    found = {}
    for name, rows in parts.items():
        squares, absolutes, largest, count = np.array(rows).T
        found[name] = {
            "rms": float(np.sqrt(squares.sum() / count.sum())),
            "mean_abs": float(absolutes.sum() / count.sum()),
            "max_abs": float(largest.max()),
        }
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| step | output | RMS | mean abs | max abs |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['step']} | {r['output']} | {r['rms']:.4g} | {r['mean_abs']:.4g} | "
        f"{r['max_abs']:.4g} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run's workdir")
    parser.add_argument(
        "--steps", default="", help="comma-separated checkpoint steps; '': the latest"
    )
    loss_gradients.add_batch_arguments(parser)
    args = parser.parse_args(argv)
    config = checkpointing.stored_config(args.workdir)
    batches, dataset = loss_gradients.first_batches(config, args.split, args.batches)
    model = registry.build_model(config, num_classes=dataset.num_classes)
    checkpoints = checkpointing.Checkpointer(args.workdir, read_only=True)
    wanted = [int(s) for s in args.steps.split(",") if s.strip()] or [None]
    rows = []
    for step in wanted:
        step, variables = checkpoints.restore_variables("latest", step)
        for name, values in scales(config, model, variables, batches).items():
            rows.append({"step": step, "output": name, **values})
    print(f"{args.workdir}, {len(batches)} batches of {args.split}:")
    print(markdown(rows))
    loss_gradients.write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
