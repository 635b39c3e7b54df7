"""Time of RetinaNet's max-IoU anchor matching alone, against the number of box slots.

``ops.matcher.max_iou_targets`` vmapped over a batch, jit-compiled once per slot count, on the
anchors of ``configs/retinanet_r18.py`` at ``--size`` px (9 a cell, P3-P7 or what the config
says) and ``--boxes`` random tiny boxes per image (the rest of the slots padding). With
``--profile``, the compiled program's most expensive operations (XLA's fusions, from a
``jax.profiler`` trace) at every slot count: which [anchors x slots] array costs what. Beside
it, the same batch matched as training does by default, in the input pipeline
(``ops.host_targets.AnchorMatcher``: numpy, one image at a time, the overlapping pairs only), in ms
of one CPU core for the whole batch.

    python benchmarks/matching_speed.py --size 128 --batch 4 --slots 16,32,64,128,256
    python benchmarks/matching_speed.py --slots 128 --profile

Prints one JSON line per slot count: ms per call (median), ns per anchor x slot pair, the
pipeline's ms for the batch (median), and, with --profile, the top operations in ms per call.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import tempfile

import jax
import numpy as np
import train_throughput  # noqa: E402  (benchmarks/ is the script's folder)

from dfrdet_jax.models import registry
from dfrdet_jax.models.heads import retinanet, single_stage


def make_match(config, anchors: np.ndarray, num_classes: int):
    """jit(batch -> targets): the matching of ``retinanet.retinanet_loss`` for a whole batch."""
    settings = retinanet.matching_settings(config)
    return jax.jit(lambda batch: retinanet.anchor_targets(batch, anchors, num_classes, **settings))


def pipeline_match(config, size: int):
    """batch -> the pipeline's anchor matches of every image (numpy, as the workers run it)."""
    config.data.image_size = size
    config.retinanet.targets_in_pipeline = True
    per_example = registry.pipeline_targets(config)

    def match(batch):
        examples = ({k: v[i] for k, v in batch.items()} for i in range(len(batch["boxes"])))
        return [per_example(example)[single_stage.MATCHED_SLOT] for example in examples]

    return match


def top_operations(fn, arg, calls: int, top: int) -> dict[str, float]:
    """ms per call of the ``top`` most expensive traced events below the executable."""
    from jax._src.lib import _profile_data  # jaxlib's trace reader; private, hence local

    skip = ("ThunkExecutor", "block_until_ready", "PjitFunction", "PjRt", "stop_trace")
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            jax.block_until_ready(fn(arg))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        profile = _profile_data.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if not any(s in event.name for s in skip):
                    totals[event.name] += event.duration_ns / 1e6 / calls
    return {name: round(ms, 2) for name, ms in totals.most_common(top)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side, px")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=100, help="real boxes per image")
    parser.add_argument("--slots", default="16,32,64,128,256", help="box slot counts")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per slot count")
    parser.add_argument("--profile", action="store_true", help="list the costliest operations")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)

    config = train_throughput.load_config("retinanet", "synthetic,real,demo")
    shape_only = {"image": np.zeros((1, args.size, args.size, 3), np.uint8)}
    anchors = retinanet._anchors(config, shape_only)
    in_pipeline = pipeline_match(config, args.size)
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        rng = np.random.default_rng(0)
        batch = train_throughput.random_batch(
            rng, args.batch, args.size, min(args.boxes, slots), slots
        )
        batch = {k: batch[k] for k in ("boxes", "labels", "box_valid", "ignore")}
        match = make_match(config, anchors, num_classes=8)
        ms = train_throughput.median_ms(lambda: match(batch), args.calls)
        row = {
            "size": args.size,
            "batch": args.batch,
            "anchors": int(anchors.shape[0]),
            "slots": slots,
            "real_boxes": min(args.boxes, slots),
            "ms": round(ms, 2),
            "ns_per_pair": round(1e6 * ms / (args.batch * anchors.shape[0] * slots), 2),
            "pipeline_ms": round(
                train_throughput.median_ms(lambda: in_pipeline(batch), args.calls), 2
            ),
            "device": jax.devices()[0].device_kind,
        }
        if args.profile:
            row["top_ms"] = top_operations(match, batch, args.calls, args.top)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
