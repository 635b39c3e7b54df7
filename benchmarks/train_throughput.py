"""Train-step throughput (images/s) and peak device memory of FCOS-R18 (or RetinaNet-R18) real /
bnn / dfr.

Runs the jit-compiled, sharded train step of ``dfrdet_jax.steps`` on whatever devices are
present, with the input either produced in memory (``--pipeline off``: the step alone) or read
through the grain pipeline on the synthetic data set (``--pipeline on``: what training sees),
and, where PyTorch with torchvision is installed, times torchvision's FCOS with a ResNet-18 FPN
backbone on the same image size and batch for comparison.

  python benchmarks/train_throughput.py --size 800 --batch 8 --steps 20        # GPU
  python benchmarks/train_throughput.py --size 128 --batch 4 --steps 5 --width small  # CPU

Prints one line per setting and, with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags

from dfrdet_jax import data, prefetch, sharding, steps
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(family: str, arg: str):
    name = f"{family}_r18"
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


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


def time_jax(variant: str, args) -> dict:
    """The train step of ``variant``: 'off' = one batch already on the devices, every step;
    'on' = the grain pipeline read ahead by train's DevicePrefetcher, as training runs."""
    config = load_config(args.family, f"synthetic,{variant}")
    config.train.batch_size = args.batch
    config.data.image_size = args.size
    config.data.max_boxes = args.max_boxes
    config.model.dtype = args.dtype
    if args.width == "small":
        config.model.backbone_width, config.model.fpn_width, config.model.head_convs = 16, 32, 2
        config.dfr.decoder_width = 16
    model = registry.build_model(config, num_classes=8)
    mesh = sharding.make_mesh()
    data_sharding = sharding.batch_sharding(mesh)
    state = steps.create_train_state(
        config, model, jax.random.key(0), (args.size, args.size), args.steps
    )
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    step = steps.make_sharded_train_step(config, model, mesh, args.steps + 1)
    if args.pipeline == "on":
        dataset = data.build_dataset(
            config.data,
            "train",
            train=True,
            batch_size=args.batch,
            seed=0,
            num_workers=args.workers,
        )
        place = functools.partial(sharding.to_global_batch, sharding=data_sharding)
        batches = prefetch.DevicePrefetcher(
            iter(dataset.loader),
            place,
            dataset.get_iterator_state,
            depth=config.train.prefetch_batches,
        )
        next_batch = lambda: next(batches)[1]  # noqa: E731
    else:
        rng = np.random.default_rng(0)
        fixed = random_batch(rng, args.batch, args.size, args.boxes, args.max_boxes)
        placed = sharding.to_global_batch(fixed, data_sharding)
        next_batch = lambda: placed  # noqa: E731

    start = time.perf_counter()
    state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    if args.pipeline == "on":
        batches.close()
    what, peak = peak_memory_gb()
    return {
        "framework": "jax",
        "family": args.family,
        "variant": variant,
        "pipeline": args.pipeline,
        "images_per_second": args.steps * args.batch / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "first_step_s": compile_s,
        what: peak,
    }


def time_torchvision(args) -> dict | None:
    """torchvision FCOS (ResNet-18 FPN) train step on the same size and batch, or None."""
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

    def step():
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
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
        "pipeline": "off",
        "images_per_second": args.steps * args.batch / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        **memory,
    }


def run_isolated(variant: str, pipeline: str) -> dict:
    """One setting in a fresh process, so its peak memory and compile are its own."""
    argv = [a for a in sys.argv[1:] if a != "--torchvision"]
    command = [sys.executable, __file__, *argv, "--variants", variant, "--pipeline", pipeline]
    output = subprocess.run(
        [*command, "--single"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def pipeline_overhead(results: list[dict]) -> list[dict]:
    """Per variant: how much slower training is with the pipeline on than with it off."""
    rows = []
    ours = [r for r in results if r["framework"] == "jax"]
    for variant in dict.fromkeys(r["variant"] for r in ours):
        ips = {r["pipeline"]: r["images_per_second"] for r in ours if r["variant"] == variant}
        if {"on", "off"} <= ips.keys():
            slowdown = 100 * (1 - ips["on"] / ips["off"])
            rows.append(
                {
                    "variant": variant,
                    "pipeline_slowdown_percent": slowdown,
                    "within_5": slowdown <= 5,
                }
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("fcos", "retinanet"), default="fcos")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    parser.add_argument("--boxes", type=int, default=100, help="objects per image")
    parser.add_argument("--max_boxes", type=int, default=1500, help="padded box slots N")
    parser.add_argument("--variants", default="real,bnn,dfr", help="'' for torchvision only")
    parser.add_argument("--pipeline", choices=("off", "on", "both"), default="both")
    parser.add_argument("--workers", type=int, default=4, help="pipeline worker processes")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--width", choices=("full", "small"), default="full")
    parser.add_argument("--torchvision", action="store_true", help="also time torchvision FCOS")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # absl defaults: grain reads its flags when it starts workers
    if args.single:  # one setting, in a process of its own (see run_isolated)
        print(json.dumps(time_jax(args.variants, args)))
        return
    print(f"devices: {jax.devices()}")
    results = []
    pipelines = ("off", "on") if args.pipeline == "both" else (args.pipeline,)
    for variant in filter(None, args.variants.split(",")):
        for pipeline in pipelines:
            results.append(run_isolated(variant, pipeline))
            print(json.dumps(results[-1]), flush=True)
    if args.torchvision and (args.width != "full" or args.family != "fcos"):
        print("torchvision: skipped, it is timed for FCOS at full widths only")
    elif args.torchvision:
        result = time_torchvision(args)
        print(json.dumps(result) if result else "torchvision: not installed")
        if result:
            results.append(result)
    overhead = pipeline_overhead(results)
    for row in overhead:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "devices": [str(d) for d in jax.devices()],
                    "args": vars(args),
                    "results": results,
                    "pipeline_overhead": overhead,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
