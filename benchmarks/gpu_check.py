"""The GPU check: every speed figure of the project in one command and one markdown report.

  python benchmarks/gpu_check.py --out_dir gpu_check            # on a GPU, about 6 minutes
  python benchmarks/gpu_check.py --out_dir /tmp/c --size 64 --batch 2 --steps 2 --width tiny \\
      --families fcos --variants real --dtypes float32 --eval_images 4 --eval_dets 10  # CPU

Parts, each a process of its own with its own time limit (``--part_timeout``) inside one overall
limit (``--total_timeout``), so that one slow part cannot eat the rest; a part that runs out of
time or fails is reported as such with the end of its log:
  train      images/s, step time, compile time, peak device memory and FLOPs per step (XLA's
             cost analysis of the compiled step; MFU against the device's dense peak) of every
             family x variant x dtype (float32 and bfloat16 for FCOS, float32 for RetinaNet and
             Faster R-CNN); FCOS float32 also with the grain pipeline on (the same executable),
             for the pipeline's slowdown;
  torchvision  torchvision's FCOS-R18 (P2-P6) on the same size and batch, where torch is
             installed (float32, and bfloat16 autocast);
  eval       the AI-TOD evaluation of ``--eval_images`` x ``--eval_dets``: the array path
             (backend numpy, the default) and faster_coco_eval.
Up to ``--concurrency`` train parts compile side by side (compiling is host work); their timed
steps take turns on the device under a file lock. Writes ``report.md``, ``results.json`` and
one log per part to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "grain",
    "numpy",
    "faster-coco-eval",
    "torch",
    "torchvision",
)
# Dense tensor-core peaks per device in TFLOP/s (NVIDIA's data sheets; no sparsity): float32
# steps are held against the TF32 peak, which XLA's default precision uses for their convs.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100": {"bfloat16": 989.4, "float32": 494.7},  # SXM
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
}


@dataclasses.dataclass
class Part:
    """One process of the check: its name, command and whether it takes a device slot."""

    name: str
    command: list[str]
    uses_device: bool = True
    status: str = "not started"
    seconds: float = 0.0
    results: list[dict] = dataclasses.field(default_factory=list)
    note: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--width", choices=("full", "small", "tiny"), default="full")
    parser.add_argument("--families", default="fcos,retinanet,faster_rcnn")
    parser.add_argument("--variants", default="real,bnn,dfr")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="FCOS's; others float32")
    parser.add_argument("--workers", type=int, default=8, help="input pipeline processes")
    parser.add_argument("--torchvision", choices=("auto", "off"), default="auto")
    parser.add_argument("--eval_images", type=int, default=2000, help="0: no evaluation part")
    parser.add_argument("--eval_dets", type=int, default=1500, help="detections per image")
    parser.add_argument("--concurrency", type=int, default=3, help="train parts at once")
    parser.add_argument("--part_timeout", type=float, default=180, help="seconds per part")
    parser.add_argument("--total_timeout", type=float, default=450, help="seconds in all")
    parser.add_argument("--peak_tflops", type=float, help="the device's peak, for MFU")
    return parser.parse_args(argv)


def make_parts(args, out_dir: pathlib.Path) -> list[Part]:
    """The parts in order of importance (they start in this order)."""
    common = [
        f"--size={args.size}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--width={args.width}",
        f"--workers={args.workers}",
        f"--data_root={out_dir / 'data'}",
        f"--lock={out_dir / 'device.lock'}",
    ]
    throughput = [sys.executable, str(HERE / "train_throughput.py"), *common]
    families = [f for f in args.families.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    dtypes = [d for d in args.dtypes.split(",") if d]
    parts = []
    if args.eval_images:
        parts.append(
            Part(
                "eval",
                [
                    sys.executable,
                    str(HERE / "eval_speed.py"),
                    f"--images={args.eval_images}",
                    f"--dets={args.eval_dets}",
                    "--skip-pycocotools",
                    "--json",
                ],
                uses_device=False,
            )
        )
    torchvision = args.torchvision == "auto" and args.width == "full"
    for family in families:
        for dtype in dtypes if family == "fcos" else ["float32"]:
            pipeline = "both" if (family, dtype) == ("fcos", "float32") else "off"
            for variant in variants:
                parts.append(
                    Part(
                        f"{family} {variant} {dtype}",
                        [
                            *throughput,
                            f"--family={family}",
                            f"--variants={variant}",
                            f"--dtype={dtype}",
                            f"--pipeline={pipeline}",
                            "--single",
                        ],
                    )
                )
            if family == "fcos" and torchvision:
                parts.append(
                    Part(
                        f"torchvision fcos {dtype}",
                        [*throughput, "--variants=", "--torchvision", f"--dtype={dtype}"],
                    )
                )
    return parts


def prepare_data(args, out_dir: pathlib.Path) -> None:
    """Generates the synthetic images the pipeline parts read, once, before they start side by
    side (they would otherwise all generate the same cache at the same time)."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    import train_throughput  # pylint: disable=g-import-not-at-top

    from dfrdet_jax import data  # pylint: disable=g-import-not-at-top

    config = train_throughput.configure(
        "real",
        train_throughput.parse_args([f"--size={args.size}", f"--data_root={out_dir / 'data'}"]),
    )
    data.build_dataset(config.data, "train", train=True, batch_size=args.batch, seed=0)


def last_json(text: str):
    """The last line of ``text`` that is JSON, or None."""
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def run_parts(parts: list[Part], args, out_dir: pathlib.Path, env: dict) -> None:
    """Runs the parts (at most ``concurrency`` device parts at once), each stopped at its own
    limit or the overall one, recording status, seconds, results and a note per part."""
    deadline = time.monotonic() + args.total_timeout
    waiting, running = list(parts), {}
    while waiting or running:
        now = time.monotonic()
        slots = args.concurrency - sum(p.uses_device for p, _ in running.values())
        for part in list(waiting):
            if now >= deadline:
                part.status, part.note = "skipped", "the overall time limit was reached first"
                waiting.remove(part)
            elif not part.uses_device or slots > 0:
                log = open(out_dir / f"{part.name.replace(' ', '_')}.log", "w")  # noqa: SIM115
                process = subprocess.Popen(
                    part.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                    start_new_session=True, text=True,
                )  # fmt: skip
                running[process] = (part, now)
                part.status = "running"
                slots -= part.uses_device
                waiting.remove(part)
        for process, (part, started) in list(running.items()):
            elapsed = time.monotonic() - started
            if process.poll() is None:
                if elapsed < args.part_timeout and time.monotonic() < deadline:
                    continue
                os.killpg(process.pid, signal.SIGKILL)  # the part and its pipeline workers
                process.wait()
                part.status = "timed out"
            del running[process]
            part.seconds = elapsed
            log_text = (out_dir / f"{part.name.replace(' ', '_')}.log").read_text()
            if part.status == "timed out":
                part.note = f"stopped after {elapsed:.0f} s"
                continue
            found = last_json(log_text) if process.returncode == 0 else None
            if found is None:
                part.status = "failed" if process.returncode else "no result"
                part.note = " / ".join(log_text.strip().splitlines()[-3:])[-300:]
            else:
                part.status = "ok"
                part.results = found if isinstance(found, list) else [found]
            print(f"[{time.strftime('%H:%M:%S')}] {part.name}: {part.status} ({elapsed:.0f} s)")
        time.sleep(0.2)


def peak_tflops(kind: str, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    for name, peaks in PEAK_TFLOPS.items():
        if name in kind:
            return peaks[dtype]
    return None


def machine_lines() -> list[str]:
    lines = [
        f"- host: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    ]
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        lines.append(f"- GPU: {smi.stdout.strip() or smi.stderr.strip()}")
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} -")
    lines.append("- versions: " + ", ".join(versions))
    return lines


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def train_rows(parts: list[Part]) -> list[dict]:
    return [r for p in parts for r in p.results if "images_per_second" in r]


def find(rows, family, variant, dtype, framework="jax", pipeline="off"):
    for r in rows:
        if (r["framework"], r["family"], r["variant"], r["dtype"], r["pipeline"]) == (
            framework,
            family,
            variant,
            dtype,
            pipeline,
        ):
            return r
    return None


def memory_of(row: dict) -> float | None:
    """GiB the step needs: XLA's buffer assignment for ours, the allocator's peak for torch."""
    for key in ("step_memory_gb", "device_peak_gb", "host_peak_rss_gb"):
        if row.get(key) is not None:
            return row[key]
    return None


def ratio_lines(rows: list[dict]) -> list[str]:
    """Time and memory ratios between the networks, all from this one run."""
    lines = []

    def compare(label, a, b):
        if a and b:
            memory = ""
            if memory_of(a) and memory_of(b):
                memory = f", memory {memory_of(a) / memory_of(b):.2f}x"
            lines.append(f"- {label}: step time {a['step_ms'] / b['step_ms']:.2f}x{memory}")

    for dtype in ("float32", "bfloat16"):
        real, bnn, dfr = (find(rows, "fcos", v, dtype) for v in ("real", "bnn", "dfr"))
        compare(f"FCOS bnn / real ({dtype})", bnn, real)
        compare(f"FCOS dfr / bnn ({dtype})", dfr, bnn)
        compare(
            f"FCOS real, ours / torchvision ({dtype})",
            real,
            find(rows, "fcos", "real", dtype, framework="torchvision"),
        )
    for family in ("retinanet", "faster_rcnn"):
        for variant in ("real", "bnn", "dfr"):
            compare(
                f"{family} / FCOS ({variant}, float32)",
                find(rows, family, variant, "float32"),
                find(rows, "fcos", variant, "float32"),
            )
    return lines


def report(parts: list[Part], args, wall_s: float) -> str:
    rows = train_rows(parts)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`, "
        f"{now:%Y-%m-%d %H:%M} UTC, {wall_s:.0f} s in all.",
        "",
        *machine_lines(),
        "",
        f"## Train step: {args.size} x {args.size} px, global batch {args.batch}, width "
        f"{args.width}, {args.steps} timed steps, 100 objects per image (box slots bucketed "
        "as training cuts them: 128 of data.max_boxes 1,500)",
        "",
        "| network | dtype | input | images/s | ms / step | compile s | step memory GiB "
        "| allocator peak GiB | GFLOP / step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = r.get("flops_per_step")
        achieved = flops / (r["step_ms"] / 1000) / 1e12 if flops else None
        peak = peak_tflops(r.get("device_kind", ""), r["dtype"], args.peak_tflops)
        devices = r.get("num_devices", 1)
        mfu = f"{100 * achieved / (peak * devices):.1f} %" if achieved and peak else "-"
        input_ = "pipeline" if r["pipeline"] == "on" else "fixed batch"
        lines.append(
            f"| {r['framework']} {r['family']} {r['variant']} | {r['dtype']} | {input_} "
            f"| {fmt(r['images_per_second'])} | {fmt(r['step_ms'])} | {fmt(r.get('compile_s'))} "
            f"| {fmt(memory_of(r), 2)} | {fmt(r.get('device_peak_gb'), 2)} "
            f"| {fmt(flops and flops / 1e9)} | {fmt(achieved, 2)} "
            f"| {mfu} |"
        )
    lines += [
        "",
        "Step memory: XLA's buffer assignment of the compiled step (arguments, outputs and "
        "temporaries; torchvision: the allocator's peak); the process's peak RSS on a CPU. "
        "Allocator peak: the device allocator's peak bytes in use, which include XLA's "
        "autotuning scratch. GFLOP / step: XLA's cost analysis of the lowered step (the compiled "
        "one on a GPU does not count cuDNN's convolutions); MFU against the dense tensor-core "
        "peak (float32 against TF32).",
        "",
        "## Ratios, from this run",
        "",
        *ratio_lines(rows),
    ]
    slowdowns = []
    for r in rows:
        if r["pipeline"] == "on":
            off = find(rows, r["family"], r["variant"], r["dtype"])
            if off:
                percent = 100 * (1 - r["images_per_second"] / off["images_per_second"])
                slowdowns.append(f"- {r['family']} {r['variant']} {r['dtype']}: {percent:+.1f} %")
    if slowdowns:
        lines += [
            "",
            f"## Input pipeline on vs off (grain, {args.workers} workers): slowdown",
            "",
            *slowdowns,
        ]
    for part in parts:
        if part.name == "eval" and part.results:
            e = part.results[0]
            lines += [
                "",
                "## Evaluation (AI-TOD protocol, on the host)",
                "",
                f"{e['images']} images x {e['detections'] // max(e['images'], 1)} detections "
                f"({e['gt_boxes']} gt boxes):",
            ]
            lines += [f"- {leg}: {seconds:.1f} s" for leg, seconds in e["seconds"].items()]
    lines += ["", "## Parts", "", "| part | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.note} |" for p in parts]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    # Device parts share the GPU: each takes the memory it needs, not 75 % of it up front.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # ... and at most its share of it, so that side-by-side compiles cannot exhaust the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.concurrency:.2f}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    parts = make_parts(args, out_dir)
    if any("--pipeline=both" in p.command for p in parts):
        prepare_data(args, out_dir)
    run_parts(parts, args, out_dir, env)
    text = report(parts, args, time.monotonic() - start)
    (out_dir / "report.md").write_text(text)
    with open(out_dir / "results.json", "w") as f:
        json.dump({"args": vars(args), "parts": [dataclasses.asdict(p) for p in parts]}, f)
    print(text)


if __name__ == "__main__":
    main()
