"""One gradient of the demo detector at its initial weights, saved or compared with a saved one.

For checking that a change computes the same gradients up to float rounding: run it at the
commit before the change with ``--out``, then after it with ``--against`` the same file. It
prints each parameter's relative difference, ||after - before|| / ||before||, worst first.

    git stash; python benchmarks/compare_gradients.py --variant bnn --out /tmp/before.npz
    git stash pop; python benchmarks/compare_gradients.py --variant bnn --against /tmp/before.npz
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import smoke  # noqa: E402  (tests/: the demo config and a synthetic batch)

from dfrdet_jax import steps  # noqa: E402
from dfrdet_jax.models import registry  # noqa: E402


def demo_gradients(variant: str, family: str, size: int, batch_size: int) -> dict[str, np.ndarray]:
    """{parameter path: gradient of the training loss} at seed 0's initial weights."""
    config = smoke.load_config(f"synthetic,{variant},demo", family)
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (size, size), 100)
    batch = smoke.make_batch(seed=0, batch_size=batch_size, size=size)
    loss = functools.partial(steps.loss_and_metrics, model=model, config=config)
    grads = jax.jit(jax.grad(lambda p: loss(p, state.batch_stats, batch, jax.random.key(1))[0]))(
        state.params
    )
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="bnn")
    parser.add_argument("--family", default="fcos")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", help="save the gradients here (.npz)")
    parser.add_argument("--against", help="compare with gradients saved by --out")
    parser.add_argument("--top", type=int, default=10, help="rows printed")
    args = parser.parse_args()
    if not (args.out or args.against):
        parser.error("give --out, --against or both")
    grads = demo_gradients(args.variant, args.family, args.size, args.batch)
    if args.out:
        np.savez(args.out, **grads)
    if args.against:
        before = np.load(args.against)
        if sorted(before.files) != sorted(grads):
            raise SystemExit(f"{args.against} holds other parameters than this model's")
        rows = sorted(
            (
                (np.linalg.norm(grads[k] - before[k]) / max(np.linalg.norm(before[k]), 1e-30), k)
                for k in grads
            ),
            reverse=True,
        )
        print(
            f"{len(rows)} parameters; median relative difference {np.median([r for r, _ in rows]):.2e}"
        )
        for rel, key in rows[: args.top]:
            print(f"{rel:.2e}  {key}  (|before| {np.linalg.norm(before[key]):.2e})")


if __name__ == "__main__":
    main()
