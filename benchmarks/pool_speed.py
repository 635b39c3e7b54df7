"""ResNet-18's training pass (forward and backward) with flax's max pool and with
``layers.max_pool``, alternating in one process, and whether their gradients are identical.

    python benchmarks/pool_speed.py --size 800 --calls 6
    python benchmarks/pool_speed.py --size 64 --width 8 --calls 1   # quick

Prints the median ms per call and XLA's temporary GiB of each, and the largest difference
between the two gradients (0 when bit-identical).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax import layers
from dfrdet_jax.models import resnet


def flax_max_pool(x, window, strides, padding):
    return nn.max_pool(x, window, strides, padding=padding)


def compiled_gradient(pool, args):
    """The backbone's parameter gradient of a fixed projection of its outputs (a plain sum
    would send almost nothing through BatchNorm), compiled with ``pool`` as ResNet's pool."""
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)), jnp.float32
    )
    net = resnet.ResNet(18, args.width)
    variables = net.init(jax.random.key(0), x, True)

    def objective(params):
        out, _ = net.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, True,
            mutable=["batch_stats"],
        )  # fmt: skip
        return sum(jnp.sum(o * jnp.cos(jnp.arange(o.size).reshape(o.shape))) for o in out.values())

    original, resnet.layers.max_pool = resnet.layers.max_pool, pool
    try:
        compiled = jax.jit(jax.grad(objective)).lower(variables["params"]).compile()
    finally:
        resnet.layers.max_pool = original
    return compiled, variables["params"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--calls", type=int, default=6, help="timed calls of each, alternating")
    args = parser.parse_args(argv)
    pools = {"flax.linen.max_pool": flax_max_pool, "layers.max_pool": layers.max_pool}
    steps = {name: compiled_gradient(pool, args) for name, pool in pools.items()}
    gradients = {name: f(params) for name, (f, params) in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(args.calls):
        for name, (f, params) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(f(params))
            times[name].append(1000 * (time.perf_counter() - start))
    difference = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(*(jax.tree.leaves(g) for g in gradients.values()), strict=True)
    )
    result = {"args": vars(args), "max_gradient_difference": difference, "rows": []}
    print(f"ResNet-18 width {args.width}, {args.batch} x {args.size} px, forward + backward:")
    for name, (f, _) in steps.items():
        row = {
            "pool": name,
            "median_ms": float(np.median(times[name])),
            "ms": [round(t, 1) for t in times[name]],
            "temp_gib": f.memory_analysis().temp_size_in_bytes / 2**30,
        }
        result["rows"].append(row)
        print(f"  {name}: {row['median_ms']:.0f} ms {row['ms']}, temp {row['temp_gib']:.3f} GiB")
    print(f"  largest gradient difference: {difference}")
    return result


if __name__ == "__main__":
    main()
