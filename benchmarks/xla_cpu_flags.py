"""Which of XLA's CPU options speed up or slim down the train step: one run of
``train_throughput.py`` per setting of ``XLA_FLAGS`` (read once, when XLA starts, hence a
process each), the same step, size and batch for all.

    python benchmarks/xla_cpu_flags.py --size 256 --batch 2 --steps 3 --variants real,bnn
    python benchmarks/xla_cpu_flags.py --settings default,onednn   # a subset

Prints a markdown table (images/s and its ratio to the default, compile s, XLA's step memory)
and, with --out, writes the rows as JSON. A setting XLA rejects is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# XLA_FLAGS of each setting (jaxlib's CPU options; `XLA_FLAGS=--help` lists them all).
SETTINGS = {
    "default": "",
    # oneDNN (MKL-DNN) thunks for matmul and convolution fusions: PyTorch's CPU convolutions.
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_graph_fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "memory_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "concurrency_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "one_thread": "--xla_cpu_multi_thread_eigen=false",
    # The older loop emitters instead of the fusion emitters (jaxlib >= 0.6): the tests' setting
    # (tests/smoke.py), which halves their compile time.
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
}


def run_setting(name: str, args) -> list[dict]:
    """train_throughput.py's rows under ``SETTINGS[name]`` (one error row if it fails)."""
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), SETTINGS[name]) if f)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags:  # XLA reads a value that is not a flag as a file of flags
        env["XLA_FLAGS"] = flags
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        command = [
            sys.executable, str(HERE / "train_throughput.py"), "--pipeline=off",
            f"--size={args.size}", f"--batch={args.batch}", f"--steps={args.steps}",
            f"--variants={args.variants}", f"--width={args.width}", f"--out={out}",
        ]  # fmt: skip
        status = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if status.returncode or not os.path.exists(out):
            tail = (status.stderr or status.stdout).strip().splitlines()[-3:]
            return [{"setting": name, "flags": SETTINGS[name], "error": " | ".join(tail)}]
        with open(out) as f:
            rows = json.load(f)["results"]
    return [{"setting": name, "flags": SETTINGS[name], **row} for row in rows]


def markdown(rows: list[dict]) -> str:
    default = {
        r["variant"]: r["images_per_second"]
        for r in rows
        if r["setting"] == "default" and "error" not in r
    }
    lines = [
        "| setting | variant | images/s | vs default | compile s | XLA step GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | - | failed: {r['error'][:80]} | | | |")
            continue
        ratio = r["images_per_second"] / default[r["variant"]] if r["variant"] in default else 0
        memory = r.get("step_memory_gb")
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['images_per_second']:.3f} | "
            f"{ratio:.2f}x | {r['compile_s']:.0f} | {memory:.2f} |"
            if memory is not None
            else f"| {r['setting']} | {r['variant']} | {r['images_per_second']:.3f} | "
            f"{ratio:.2f}x | {r['compile_s']:.0f} | - |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of SETTINGS")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="real,bnn")
    parser.add_argument("--width", default="full")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    if "default" not in names:
        names.insert(0, "default")  # the ratios' reference
    rows = []
    for name in names:
        for row in run_setting(name, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
