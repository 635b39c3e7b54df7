"""Train-step throughput (images/s) and peak device memory of FCOS-R18 (or RetinaNet-R18,
Faster R-CNN-R18) real / bnn / dfr.

Runs the jit-compiled, sharded train step of ``dfrdet_jax.steps`` on whatever devices are
present, with the input either produced in memory (``--pipeline off``: the step alone) or read
through the grain pipeline on the synthetic data set (``--pipeline on``: what training sees),
and, where PyTorch with torchvision is installed, times torchvision's FCOS with a ResNet-18 FPN
backbone on the same image size and batch for comparison.

Box slots (``--slots``): 'bucketed' (what training does: each batch's box arrays cut to the
smallest bucket of ``data.box_slots`` that holds them), 'padded' (every batch at --max_boxes
slots) and 'real' (the fixed batch at exactly --boxes slots, pipeline off only: the cost of the
real boxes alone). Target assignment (``--matching``; FCOS's points, RetinaNet's anchors, Faster
R-CNN's RPN anchors): 'pipeline' (what training does: ``config.<family>.targets_in_pipeline``,
each image's points or anchors assigned in the input pipeline, so the step reads the
assignment; pipeline off: assigned once, outside the timed step) or 'step' (over every box
slot, in the train step). With several families and
slot settings the summary gives each family's step against FCOS's (same assignment setting) and
each slot setting's step against 'real', all from one invocation.

  python benchmarks/train_throughput.py --size 800 --batch 8 --steps 20        # GPU
  python benchmarks/train_throughput.py --size 128 --batch 4 --steps 5 --width small  # CPU
  python benchmarks/train_throughput.py --size 128 --batch 4 --steps 10 --width small \
      --family fcos,retinanet --variants real --pipeline off --slots padded,bucketed,real
  python benchmarks/train_throughput.py --size 128 --batch 4 --steps 10 --width small \
      --family fcos,retinanet --variants real --matching pipeline,step --workers 1

Prints one line per setting and, with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable

import jax
import numpy as np
from absl import flags

from dfrdet_jax import data, host_memory, prefetch, sharding, steps
from dfrdet_jax.data import box_slots
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def median_ms(call: Callable[[], object], num_calls: int) -> float:
    """Median wall time in ms of ``num_calls`` calls of ``call``, each blocked until its
    outputs are ready, after one untimed call (compilation, caches)."""
    jax.block_until_ready(call())
    times = []
    for _ in range(num_calls):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def load_config(family: str, arg: str):
    name = f"{family}_r18"
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# Network widths: (backbone, FPN, head convs, DFR decoder). 'full' is the paper's ResNet-18,
# 'small' the demo's, 'tiny' the smoke test's (for the CPU test of gpu_check).
WIDTHS = {"full": (64, 256, 4, 64), "small": (16, 32, 2, 16), "tiny": (8, 16, 1, 8)}
FAMILIES = ("fcos", "retinanet", "faster_rcnn")
PIPELINE_TARGETS = ("fcos", "retinanet", "faster_rcnn")  # those that can assign in the pipeline
SLOTS = ("bucketed", "padded", "real")
MATCHING = ("pipeline", "step")


def random_batch(rng, batch: int, size: int, num_boxes: int, max_boxes: int):
    """A batch in the standard format with ``num_boxes`` random tiny boxes per image."""
    image = rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    wh = rng.uniform(2, 32, (batch, max_boxes, 2))
    xy = rng.uniform(0, size - 32, (batch, max_boxes, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    valid = np.arange(max_boxes)[None, :] < num_boxes
    valid = np.broadcast_to(valid, (batch, max_boxes))
    return {
        "image": image,
        "boxes": np.where(valid[..., None], boxes, 0).astype(np.float32),
        "labels": np.where(valid, rng.integers(0, 8, (batch, max_boxes)), -1).astype(np.int32),
        "box_valid": valid.copy(),
        "ignore": np.zeros((batch, max_boxes), bool),
        "image_id": np.arange(batch, dtype=np.int32),
        "image_hw": np.full((batch, 2), size, np.int32),
        "scale": np.ones(batch, np.float32),
    }


def peak_memory_gb() -> tuple[str, float | None]:
    """(what, GiB): the first device's peak memory, or the process's peak RSS on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device_peak_gb", stats["peak_bytes_in_use"] / 2**30
    return "host_peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_flops(lowered) -> float | None:
    """FLOPs of one step from XLA's cost analysis of the lowered (not yet compiled) program:
    after compilation for a GPU the convolutions are cuDNN calls that the analysis does not
    count. None if the analysis has no figure."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def step_memory_gb(compiled) -> float | None:
    """GiB the compiled step needs on a device by XLA's buffer assignment (arguments, outputs
    and temporaries, less donated buffers reused for outputs); None if XLA gives no figure."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**30


@contextlib.contextmanager
def device_lock(lock_path: str | None, exclusive: bool):
    """A file lock shared by processes that use the device side by side (none if ``lock_path``
    is None): compiling holds it shared (compiles overlap), timing holds it exclusive, so no
    other process compiles (XLA's autotuning runs kernels) or times while one is timed."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def configure(
    variant: str,
    args,
    family: str | None = None,
    slots: str = "bucketed",
    matching: str = "pipeline",
):
    """The config of ``family`` (default: the first of --family) ``variant`` at the arguments'
    sizes; ``slots`` 'padded' turns the pipeline's box-slot buckets off, ``matching`` 'step'
    the assignment of the family's targets in the pipeline."""
    config = load_config(family or args.family.split(",")[0], f"synthetic,{variant}")
    if config.model.name in PIPELINE_TARGETS:
        config[config.model.name].targets_in_pipeline = matching == "pipeline"
    config.train.batch_size = args.batch
    config.data.image_size = args.size
    config.data.max_boxes = args.max_boxes
    if slots == "padded":
        config.data.min_box_slots = args.max_boxes
    config.data.root = args.data_root
    config.data.synthetic.num_train = args.num_images
    config.data.synthetic.num_val = config.data.synthetic.num_test = 1
    config.model.dtype = args.dtype
    backbone, fpn, convs, decoder = WIDTHS[args.width]
    config.model.backbone_width, config.model.fpn_width = backbone, fpn
    config.model.head_convs, config.dfr.decoder_width = convs, decoder
    return config


def fixed_batch(config, args, slots: str) -> dict:
    """The in-memory batch of ``args.boxes`` random boxes per image in ``slots``' box slots:
    --max_boxes ('padded'), the pipeline's bucket ('bucketed') or exactly --boxes ('real')."""
    rng = np.random.default_rng(0)
    num_slots = args.boxes if slots == "real" else args.max_boxes
    batch = random_batch(rng, args.batch, args.size, args.boxes, num_slots)
    buckets = box_slots.slot_buckets(config.data.max_boxes, config.data.min_box_slots)
    if slots == "bucketed":
        batch = box_slots.trim_box_slots(batch, buckets)
    return with_pipeline_targets(config, batch)


def with_pipeline_targets(config, batch: dict) -> dict:
    """``batch`` (numpy) with the targets the training pipeline adds to each example for
    ``config`` (``registry.pipeline_targets``: FCOS's, RetinaNet's, the RPN's), made here once,
    outside any timing; ``batch`` itself when there are none."""
    make_targets = registry.pipeline_targets(config)
    if make_targets is None:
        return batch
    size = len(batch["image"])
    examples = [make_targets({k: v[i] for k, v in batch.items()}) for i in range(size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class StepExecutables:
    """The sharded train step compiled ahead of time once per box-slot count N: the pipeline's
    bucketed batches come in a few shapes. Call it as the step: (state, batch) -> (state,
    metrics)."""

    def __init__(self, step, state):
        self._step = step
        self._state = jax.tree.map(  # shapes only: the state's buffers are donated
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        self.lowered, self.compiled, self.compile_s = {}, {}, {}

    def has(self, batch) -> bool:
        return batch["boxes"].shape[1] in self.compiled

    def lower(self, batch):
        slots = batch["boxes"].shape[1]
        self.lowered[slots] = self._step.lower(self._state, batch)
        return self.lowered[slots]

    def compile(self, batch) -> None:
        """Lowers (unless done) and compiles the step for ``batch``'s box-slot count, timed."""
        slots = batch["boxes"].shape[1]
        start = time.perf_counter()
        lowered = self.lowered.get(slots) or self.lower(batch)
        self.compiled[slots] = lowered.compile()
        self.compile_s[slots] = time.perf_counter() - start

    def __call__(self, state, batch):
        return self.compiled[batch["boxes"].shape[1]](state, batch, None)


def time_steps(executables, state, next_batch, num_steps: int) -> tuple[float, object]:
    """Seconds per step of ``num_steps`` calls (after one untimed call) and the final state; a
    batch of a box-slot count not compiled yet is compiled with the clock stopped."""
    batch = next_batch()
    if not executables.has(batch):
        executables.compile(batch)
    state, metrics = executables(state, batch)
    jax.block_until_ready(metrics)
    elapsed, start = 0.0, time.perf_counter()
    for _ in range(num_steps):
        batch = next_batch()
        if not executables.has(batch):
            jax.block_until_ready(metrics)
            elapsed += time.perf_counter() - start
            executables.compile(batch)
            start = time.perf_counter()
        state, metrics = executables(state, batch)
    jax.block_until_ready(metrics)
    return (elapsed + time.perf_counter() - start) / num_steps, state


def time_jax(family: str, variant: str, slots: str, matching: str | None, args) -> list[dict]:
    """The train step of ``family`` ``variant`` with ``slots`` box slots, compiled ahead of time
    (its FLOPs from XLA's cost analysis), then timed with the input 'off' (one batch already on
    the devices, every step) and/or 'on' (the grain pipeline read ahead by train's
    DevicePrefetcher, as training runs; 'real' slots: off only), one executable per box-slot
    count for both. ``matching``: see the module docstring; None for a family without it. One result
    per pipeline setting."""
    config = configure(variant, args, family, slots, matching or "pipeline")
    config.train.retain_freed_host_memory = args.host_memory == "retain"
    host_memory.apply_config(config)  # as training does (a process per setting)
    model = registry.build_model(config, num_classes=8)
    mesh = sharding.make_mesh()
    data_sharding = sharding.batch_sharding(mesh)
    state = steps.create_train_state(
        config, model, jax.random.key(0), (args.size, args.size), args.steps
    )
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    step = steps.make_sharded_train_step(config, model, mesh, 2 * args.steps + 2)
    executables = StepExecutables(step, state)
    fixed = fixed_batch(config, args, slots)
    placed = sharding.to_global_batch(fixed, data_sharding)
    num_slots = fixed["boxes"].shape[1]
    with device_lock(args.lock, exclusive=False):
        if args.lower_only:  # FLOPs without compiling: the same on every device
            return [{"family": family, "variant": variant, "dtype": args.dtype,
                     "flops_per_step": step_flops(executables.lower(placed))}]  # fmt: skip
        executables.compile(placed)
    lowered, compiled = executables.lowered[num_slots], executables.compiled[num_slots]
    pipelines = ("off", "on") if args.pipeline == "both" else (args.pipeline,)
    if slots == "real":
        pipelines = tuple(p for p in pipelines if p == "off")
    if "on" in pipelines:  # started before the lock, so its workers' start is not timed
        dataset = data.build_dataset(
            config.data,
            "train",
            train=True,
            batch_size=args.batch,
            seed=0,
            num_workers=args.workers,
            example_map=registry.pipeline_targets(config),
        )
        place = functools.partial(sharding.to_global_batch, sharding=data_sharding)
        batches = prefetch.DevicePrefetcher(
            iter(dataset.loader),
            place,
            dataset.get_iterator_state,
            depth=config.train.prefetch_batches,
        )
    results = []
    with device_lock(args.lock, exclusive=True):
        for pipeline in pipelines:
            if pipeline == "on":
                next_batch = lambda: next(batches)[1]  # noqa: E731
            else:
                next_batch = lambda: placed  # noqa: E731
            seconds, state = time_steps(executables, state, next_batch, args.steps)
            what, peak = peak_memory_gb()
            results.append(
                {
                    "framework": "jax",
                    "family": family,
                    "variant": variant,
                    "dtype": args.dtype,
                    "pipeline": pipeline,
                    "slots": slots,
                    "matching": matching,
                    "host_memory": args.host_memory,
                    "box_slots": num_slots,
                    "images_per_second": args.batch / seconds,
                    "step_ms": 1000 * seconds,
                    "compile_s": executables.compile_s[num_slots],
                    "compiled_box_slots": sorted(executables.compiled),
                    "flops_per_step": step_flops(lowered),
                    "step_memory_gb": step_memory_gb(compiled),
                    "device_kind": jax.devices()[0].device_kind,
                    "num_devices": jax.device_count(),
                    what: peak,
                }
            )
    if "on" in pipelines:
        batches.close()
    return results


def torchvision_fcos(args):
    """torchvision's FCOS (ResNet-18 FPN, P2-P6) in training mode on ``args.size`` and
    ``args.batch``, its optimizer, one batch of ``random_batch``'s boxes (``images``: a list of
    [3, H, W] tensors in [0, 1]; ``targets``) and ``step()``, one training step; None where
    torchvision is not installed."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
        from torchvision.models.detection import FCOS  # pylint: disable=g-import-not-at-top
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # P2-P5 plus a pooled P6: five levels of strides 4-64, as our FCOS (P6 is a conv there).
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5, returned_layers=[1, 2, 3, 4]
    )
    model = FCOS(backbone, num_classes=9, min_size=args.size, max_size=args.size).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    batch = random_batch(rng, args.batch, args.size, args.boxes, args.max_boxes)
    images = [
        torch.as_tensor(im).permute(2, 0, 1).float().div(255).to(device) for im in batch["image"]
    ]
    targets = [
        {
            "boxes": torch.as_tensor(b[v]).to(device),
            "labels": torch.as_tensor(labels[v].astype(np.int64) + 1).to(device),
        }
        for b, labels, v in zip(batch["boxes"], batch["labels"], batch["box_valid"], strict=True)
    ]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            losses = model(images, targets)
            loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return types.SimpleNamespace(
        torch=torch, device=device, model=model, optimizer=optimizer, images=images,
        targets=targets, step=step,
    )  # fmt: skip


def time_torchvision(args) -> dict | None:
    """torchvision FCOS (ResNet-18 FPN) train step on the same size and batch, or None."""
    fcos = torchvision_fcos(args)
    if fcos is None:
        return None
    torch, device, step = fcos.torch, fcos.device, fcos.step
    with device_lock(args.lock, exclusive=True):
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if device == "cuda":
        memory = {"device_peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    else:
        memory = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {
        "framework": "torchvision",
        "family": "fcos",
        "variant": "real",
        "dtype": args.dtype,
        "pipeline": "off",
        "images_per_second": args.steps * args.batch / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        **memory,
    }


def run_isolated(family: str, variant: str, slots: str, matching: str | None) -> list[dict]:
    """One setting in a fresh process, so its peak memory and compile are its own."""
    argv = [a for a in sys.argv[1:] if a != "--torchvision"]
    command = [sys.executable, __file__, *argv, "--family", family, "--variants", variant]
    command += ["--slots", slots, "--matching", matching or "pipeline", "--single"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _setting(result: dict) -> tuple:
    """(family, variant, dtype, slots, matching) of a result of ``time_jax``."""
    return tuple(result.get(k) for k in ("family", "variant", "dtype", "slots", "matching"))


def pipeline_overhead(results: list[dict]) -> list[dict]:
    """Per network and box slots: how much slower training is with the pipeline on than off."""
    rows = []
    ours = [r for r in results if r["framework"] == "jax"]
    for key in dict.fromkeys(_setting(r) for r in ours):
        ips = {r["pipeline"]: r["images_per_second"] for r in ours if _setting(r) == key}
        if {"on", "off"} <= ips.keys():
            slowdown = 100 * (1 - ips["on"] / ips["off"])
            family, variant, dtype, slots, matching = key
            rows.append(
                {
                    "family": family,
                    "variant": variant,
                    "dtype": dtype,
                    "slots": slots,
                    "matching": matching,
                    "pipeline_slowdown_percent": slowdown,
                    "within_5": slowdown <= 5,
                }
            )
    return rows


def step_ratios(results: list[dict]) -> list[dict]:
    """Step-time ratios within one invocation, pipeline off: each family's step over FCOS's
    (same variant, dtype and slots), and each slot setting's step over 'real' slots (same
    network): the cost of padding."""
    off = {
        _setting(r): r["step_ms"]
        for r in results
        if r["framework"] == "jax" and r["pipeline"] == "off"
    }
    rows = []
    for (family, variant, dtype, slots, matching), ms in off.items():
        network = {"family": family, "variant": variant, "dtype": dtype, "matching": matching}
        fcos = off.get(("fcos", variant, dtype, slots, matching))
        if family != "fcos" and fcos:
            rows.append({"ratio": f"{family} / fcos", **network, "slots": slots,
                         "step_ratio": ms / fcos})  # fmt: skip
        real = off.get((family, variant, dtype, "real", matching))
        if slots != "real" and real:
            rows.append({"ratio": f"{slots} / real slots", **network,
                         "padding_cost_percent": 100 * (ms / real - 1)})  # fmt: skip
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family", default="fcos", help="comma list of fcos, retinanet, faster_rcnn"
    )
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    parser.add_argument("--boxes", type=int, default=100, help="objects per image")
    parser.add_argument("--max_boxes", type=int, default=1500, help="data.max_boxes")
    parser.add_argument(
        "--slots", default="bucketed", help="comma list of bucketed, padded, real (module doc)"
    )
    parser.add_argument(
        "--matching", default="pipeline", help="comma list of pipeline, step (FCOS, RetinaNet)"
    )
    parser.add_argument("--variants", default="real,bnn,dfr", help="'' for torchvision only")
    parser.add_argument("--pipeline", choices=("off", "on", "both"), default="both")
    parser.add_argument("--workers", type=int, default=4, help="pipeline worker processes")
    parser.add_argument("--num_images", type=int, default=64, help="synthetic training images")
    parser.add_argument(
        "--data_root",
        default=tempfile.gettempdir() + "/dfrdet_jax_bench",
        help="cache folder of the synthetic images the pipeline reads",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--host_memory",
        choices=("retain", "default"),
        default="retain",
        help="config.train.retain_freed_host_memory: glibc's malloc keeps freed memory "
        "(training's default) or is left as it is",
    )
    parser.add_argument("--width", choices=sorted(WIDTHS), default="full")
    parser.add_argument("--torchvision", action="store_true", help="also time torchvision FCOS")
    parser.add_argument("--lock", help="file lock held while timing (for concurrent processes)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--lower_only", action="store_true", help="only the FLOPs per step (no compile, no timing)"
    )
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, allowed in (("family", FAMILIES), ("slots", SLOTS), ("matching", MATCHING)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: {sorted(unknown)} not in {allowed}")
    return args


def main():
    args = parse_args()
    flags.FLAGS(sys.argv[:1])  # absl defaults: grain reads its flags when it starts workers
    if args.single:  # one setting, in a process of its own (see run_isolated)
        matching = args.matching if args.family in PIPELINE_TARGETS else None
        print(json.dumps(time_jax(args.family, args.variants, args.slots, matching, args)))
        return
    print(f"devices: {jax.devices()}")
    results = []
    for family in args.family.split(","):
        for variant in filter(None, args.variants.split(",")):
            for slots in args.slots.split(","):
                for matching in args.matching.split(",") if family in PIPELINE_TARGETS else [None]:
                    for result in run_isolated(family, variant, slots, matching):
                        results.append(result)
                        print(json.dumps(result), flush=True)
    if args.torchvision and (args.width != "full" or "fcos" not in args.family.split(",")):
        print("torchvision: skipped, it is timed for FCOS at full widths only")
    elif args.torchvision:
        result = time_torchvision(args)
        print(json.dumps(result) if result else "torchvision: not installed")
        if result:
            results.append(result)
    overhead = pipeline_overhead(results)
    ratios = step_ratios(results)
    for row in overhead + ratios:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "devices": [str(d) for d in jax.devices()],
                    "args": vars(args),
                    "results": results,
                    "pipeline_overhead": overhead,
                    "step_ratios": ratios,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
