"""Where a 1-bit run's latent weights sit: how many changed sign since its start, how many sit
near zero (one step from flipping), and how far its learned scales alpha are from mean|w|.

    python benchmarks/latent_weights.py runs/fcos_w64_exp_scale/bnn_lr16x/seed0 \\
        runs/fcos_w64_exp_scale/bnn_scale_none_lr16x/seed0

For each workdir (a finished run of ``python -m dfrdet_jax.main``), its best checkpoint's 1-bit
kernels (the layers that binarize their weights; ``complexity.trace_layers`` names them) are
compared with the same kernels of the checkpoint it started from (``config.init_from``, that
run's ``config.init_from_checkpoint``). Kernels whose shape differs from the start's were newly
initialised, so their flips are not counted; they are counted apart. Prints one markdown row per
workdir and, with ``--out``, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json

import flax
import numpy as np

from dfrdet_jax import checkpointing, complexity, evaluate

NEAR_ZERO = 0.25  # |w| under this fraction of its output channel's mean|w|


def restored(workdir: str, which: str = "best"):
    """(the run's stored config, its model, its ``which`` checkpoint's params as {path: array})."""
    config = checkpointing.stored_config(workdir)
    config.eval.checkpoint = which
    model, state, _, _ = evaluate.restored_state(config, workdir)
    return config, model, flax.traverse_util.flatten_dict(state.params)


def latent_weight_stats(workdir: str) -> dict:
    """{'weights', 'copied', 'flipped', 'near_zero', 'alpha_over_mean_abs': [1, 50, 99 %]}:
    shares of the 1-bit weights (flipped: of those whose kernel the start had, same shape)."""
    config, model, params = restored(workdir)
    size = config.data.image_size
    kernels = complexity.trace_layers(model, (size, size), train=False).binary_kernels
    if not kernels:
        raise ValueError(f"{workdir}: its model has no 1-bit kernels")
    start = {}
    if config.init_from:
        _, _, start = restored(config.init_from, config.init_from_checkpoint)
    weights = copied = flipped = near = 0
    ratios = []
    for path, scale in kernels.items():
        w = np.asarray(params[path])
        mean_abs = np.abs(w).reshape(-1, w.shape[-1]).mean(axis=0)
        weights += w.size
        near += int(np.sum(np.abs(w) < NEAR_ZERO * mean_abs))
        w0 = start.get(path)  # None: the start has no such layer
        if w0 is not None and w0.shape == w.shape:
            copied += w.size
            flipped += int(np.sum(np.sign(w) != np.sign(np.asarray(w0))))
        if scale == "learned":
            ratios.append(np.abs(np.asarray(params[(*path[:-1], "alpha")])) / mean_abs)
    ratio = np.concatenate(ratios) if ratios else None
    return {
        "workdir": workdir,
        "weights": weights,
        "copied": copied,
        "flipped": flipped / copied if copied else None,
        "near_zero": near / weights,
        "alpha_over_mean_abs": None
        if ratio is None
        else np.percentile(ratio, [1, 50, 99]).tolist(),
    }


def markdown_row(row: dict) -> str:
    flipped = "-" if row["flipped"] is None else f"{row['flipped']:.1%}"
    alpha = row["alpha_over_mean_abs"]
    alpha = "-" if alpha is None else " / ".join(f"{a:.3f}" for a in alpha)
    return (
        f"| {row['workdir']} | {row['weights']:,} | {row['copied']:,} | {flipped} | "
        f"{row['near_zero']:.1%} | {alpha} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", help="write the rows here (.json)")
    args = parser.parse_args(argv)
    rows = [latent_weight_stats(workdir) for workdir in args.workdirs]
    print(
        "| run | 1-bit weights | of them in the start | sign flipped since the start | "
        f"abs(w) < {NEAR_ZERO} mean abs(w) | abs(alpha) / mean abs(w), 1 / 50 / 99 % |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(markdown_row(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
