"""One convolution on the CPU: XLA's, this project's, and torch's (oneDNN), with gradients.

The CPU train step's time sits in the head (benchmarks/README.md, "Where the step goes"), whose
work is 3x3, 256-channel convolutions over P2. This script times one such layer alone, on the
same data, in one process (so one run's ratios share its load), three ways: XLA's convolution
and its own gradients (``jax.lax.conv_general_dilated``), the project's
(``layers.conv_general_dilated``: XLA's forward and input gradient, the kernel gradient as one
matmul per tap on CPU, or one over the input's patches for a strided conv), and torch's
``conv2d`` where torch is installed. Each is timed forward
alone, and forward with the input gradient, the kernel gradient and both, as a train step runs
them; the rows after the first report their largest difference from XLA's numbers.

    python benchmarks/conv_speed.py                         # the head's P2 conv at 512 px
    python benchmarks/conv_speed.py --size 200 --steps 3    # ... at 800 px
    python benchmarks/conv_speed.py --size 800 --channels 3 --out_channels 64 --kernel 7 \
        --stride 2                                          # ResNet's stem at 800 px
    taskset -c 0 python benchmarks/conv_speed.py            # one core (torch follows the mask)

torch is optional (a scratch environment with `pip install torch`). Prints a markdown table (ms
per call, GFLOP/s) and, with --out, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import train_throughput  # noqa: E402  (benchmarks/ is the script's folder)

from dfrdet_jax import layers
from dfrdet_jax.layers import conv as conv_lib


def output_size(args) -> int:
    """The output side of the conv ``make_conv`` makes (padding kernel // 2, ``args.stride``)."""
    return (args.size + 2 * (args.kernel // 2) - args.kernel) // args.stride + 1


def conv_flops(args) -> float:
    """Multiply-adds x 2 of the conv: [batch, size, size, channels] -> [batch, out, out,
    out_channels] with a kernel x kernel window."""
    taps = args.kernel * args.kernel
    return 2.0 * args.batch * output_size(args) ** 2 * args.channels * args.out_channels * taps


def make_inputs(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [B, H, W, C], kernel [k, k, C, C_out] (HWIO) and an output cotangent [B, H_out, W_out,
    C_out], float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, args.channels), dtype=np.float32)
    kernel = rng.standard_normal(
        (args.kernel, args.kernel, args.channels, args.out_channels), dtype=np.float32
    )
    kernel /= np.float32(np.sqrt(args.kernel * args.kernel * args.channels))
    out_shape = (args.batch, output_size(args), output_size(args), args.out_channels)
    cotangent = rng.standard_normal(out_shape, dtype=np.float32)
    return x, kernel, cotangent


def make_conv(conv_general_dilated, stride: int = 1):
    """A conv through ``conv_general_dilated`` with zero padding k // 2 on every side
    (torchvision's), NHWC / HWIO."""

    def conv(x, kernel):
        pad = kernel.shape[0] // 2
        return conv_general_dilated(
            x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
            dimension_numbers=conv_lib.channels_last_dimension_numbers(x.ndim),
        )  # fmt: skip

    return conv


def time_jax(label: str, conv, x, kernel, cotangent, steps: int) -> tuple[dict, np.ndarray, tuple]:
    """ms of ``conv``'s forward, and of the forward with the input gradient, the kernel gradient
    and both (as a train step runs it, and as torch's autograd times it); its output and
    gradients."""
    args = tuple(map(jnp.asarray, (x, kernel, cotangent)))
    forward = jax.jit(conv)

    def with_gradients(*which):
        def run(x, kernel, cotangent):
            out, vjp = jax.vjp(conv, x, kernel)
            grads = vjp(cotangent)
            return out, *(grads[i] for i in which)  # XLA drops a gradient not returned

        return jax.jit(run)

    def timed(fn):
        return train_throughput.median_ms(lambda: fn(*args), steps)

    train = with_gradients(0, 1)
    row = {
        "framework": label,
        "forward_ms": train_throughput.median_ms(lambda: forward(*args[:2]), steps),
        "input_grad_ms": timed(with_gradients(0)),
        "kernel_grad_ms": timed(with_gradients(1)),
        "train_ms": timed(train),
    }
    out, *grads = jax.tree.map(np.asarray, train(*args))
    return row, out, tuple(grads)


def time_torch(
    x, kernel, cotangent, stride: int, steps: int
) -> tuple[dict, np.ndarray, tuple] | None:
    """The same with torch's conv2d in channels-last memory (oneDNN's layout); None without
    torch. Outputs and gradients come back as NHWC / HWIO numpy arrays."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pad = kernel.shape[0] // 2
    channels_last = torch.channels_last
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    tw = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous(memory_format=channels_last)
    tg = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    tx.requires_grad_(True)
    tw.requires_grad_(True)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)

    def grad_of(*inputs):
        def backward():
            tx.grad = tw.grad = None
            torch.autograd.backward(
                torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad),
                tg,
                inputs=list(inputs),
            )
            return tx.grad, tw.grad

        return backward

    train = grad_of(tx, tw)
    row = {
        "framework": f"torch {torch.__version__}: conv2d, channels-last (oneDNN)",
        "forward_ms": train_throughput.median_ms(forward, steps),
        "input_grad_ms": train_throughput.median_ms(grad_of(tx), steps),
        "kernel_grad_ms": train_throughput.median_ms(grad_of(tw), steps),
        "train_ms": train_throughput.median_ms(train, steps),
    }
    dx, dw = train()
    grads = (dx.permute(0, 2, 3, 1).numpy(), dw.detach().permute(2, 3, 1, 0).numpy())
    return row, forward().permute(0, 2, 3, 1).numpy(), grads


def _max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def compare(args) -> list[dict]:
    """One row per implementation, with GFLOP/s; every row after the first also holds its
    largest difference from the first's output and gradients, relative to their largest
    magnitude."""
    x, kernel, cotangent = make_inputs(args)
    flops = conv_flops(args)
    results = [
        time_jax(f"jax {jax.__version__}: jax.lax.conv_general_dilated (XLA)",
                 make_conv(jax.lax.conv_general_dilated, args.stride), x, kernel, cotangent,
                 args.steps),
        time_jax("dfrdet_jax.layers.conv_general_dilated (kernel gradient by taps or patches "
                 "on CPU)", make_conv(layers.conv_general_dilated, args.stride), x, kernel,
                 cotangent, args.steps),
    ]  # fmt: skip
    torch_result = time_torch(x, kernel, cotangent, args.stride, args.steps)
    if torch_result is not None:
        results.append(torch_result)
    (xla_row, xla_out, xla_grads), rows = results[0], [r[0] for r in results]
    for row, out, grads in results[1:]:
        row["max_relative_error"] = max(
            _max_relative_error(a, b)
            for a, b in zip((out, *grads), (xla_out, *xla_grads), strict=True)
        )
    for row in rows:
        row["forward_gflops"] = flops / row["forward_ms"] / 1e6
        row["train_gflops"] = 3 * flops / row["train_ms"] / 1e6  # forward + two gradient convs
        row["forward_vs_xla"] = xla_row["forward_ms"] / row["forward_ms"]
        row["train_vs_xla"] = xla_row["train_ms"] / row["train_ms"]
    return rows


# (batch, map side, channels) of the sweep: the demo's and the full widths' convs at 128-800 px.
SWEEP = (
    (8, 64, 16), (8, 32, 32), (8, 32, 64), (8, 16, 128), (8, 16, 256), (2, 32, 128),
    (2, 64, 64), (8, 64, 64), (2, 64, 128), (8, 32, 128), (4, 32, 256), (2, 64, 256),
    (2, 128, 128), (2, 128, 256), (2, 200, 256),
)  # fmt: skip


def _taps_at_any_size(*args, **kwargs):
    """``layers.conv_general_dilated`` with its size threshold off while it traces."""
    threshold = conv_lib.MIN_MULTIPLY_ADDS_PER_TAP
    conv_lib.MIN_MULTIPLY_ADDS_PER_TAP = 0
    try:
        return conv_lib.conv_general_dilated(*args, **kwargs)
    finally:
        conv_lib.MIN_MULTIPLY_ADDS_PER_TAP = threshold


def sweep(steps: int) -> list[dict]:
    """The kernel gradient of a 3x3 conv, XLA's against the tap sum (forced at every size), over
    ``SWEEP``: where the tap sum pays off (``layers.conv.MIN_MULTIPLY_ADDS_PER_TAP``)."""
    rows = []
    for batch, size, channels in SWEEP:
        args = argparse.Namespace(
            batch=batch, size=size, channels=channels, out_channels=channels, kernel=3, stride=1
        )
        x, kernel, cotangent = map(jnp.asarray, make_inputs(args))
        times = {}
        for name, conv in (
            ("xla", make_conv(jax.lax.conv_general_dilated)),
            ("taps", make_conv(_taps_at_any_size)),
        ):
            run = jax.jit(lambda x, k, g, conv=conv: jax.vjp(conv, x, k)[1](g)[1])
            times[name] = train_throughput.median_ms(
                lambda run=run: run(x, kernel, cotangent), steps
            )
        per_tap = batch * size * size * channels * channels
        rows.append(
            {"batch": batch, "size": size, "channels": channels, "multiply_adds_per_tap": per_tap,
             "xla_ms": times["xla"], "taps_ms": times["taps"],
             "taps_speedup": times["xla"] / times["taps"],
             "uses_taps": per_tap >= conv_lib.MIN_MULTIPLY_ADDS_PER_TAP}
        )  # fmt: skip
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    lines = [
        "| batch x side x channels | multiply-adds per tap | XLA ms | taps ms | taps speed-up "
        "| served by taps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} x {r['size']} x {r['channels']} | 2^"
            f"{np.log2(r['multiply_adds_per_tap']):.1f} | {r['xla_ms']:,.1f} | "
            f"{r['taps_ms']:,.1f} | {r['taps_speedup']:.2f}x | "
            f"{'yes' if r['uses_taps'] else 'no'} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict], args) -> str:
    title = (
        f"{args.kernel}x{args.kernel} conv, stride {args.stride}, [{args.batch}, {args.size}, "
        f"{args.size}, {args.channels}] -> {args.out_channels} channels, float32, "
        f"{len(os.sched_getaffinity(0))} cores, median of {args.steps} calls"
    )
    lines = [
        title,
        "",
        "| framework | forward ms | forward + input gradient ms | forward + kernel gradient ms "
        "| forward + both ms | GFLOP/s (forward / all) | speed vs XLA (forward / all) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['forward_ms']:,.1f} | {r['input_grad_ms']:,.1f} | "
            f"{r['kernel_grad_ms']:,.1f} | {r['train_ms']:,.1f} | {r['forward_gflops']:.0f} / "
            f"{r['train_gflops']:.0f} | {r['forward_vs_xla']:.2f}x / {r['train_vs_xla']:.2f}x |"
        )
    lines.append("")
    for r in rows[1:]:
        lines.append(
            f"{r['framework']} against XLA's (output and both gradients): max relative error "
            f"{r['max_relative_error']:.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="map side (P2 of a 512 px image)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--out_channels", type=int, help="default: --channels")
    parser.add_argument("--steps", type=int, default=5, help="timed calls (median)")
    parser.add_argument(
        "--sweep", action="store_true", help="the tap sum's kernel gradient against XLA's, by size"
    )
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.out_channels = args.out_channels or args.channels
    if args.sweep:
        rows = sweep(args.steps)
        print(sweep_markdown(rows))
    else:
        rows = compare(args)
        print(markdown(rows, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
