"""AI-TOD evaluation speed and memory: the array path vs faster_coco_eval (and pycocotools).

Generates a random COCO set (tiny boxes, near-duplicate and background detections) and scores
it with ``evaluation.evaluate(..., protocol='aitod')`` once per backend, each in its own
process so that one leg's memory does not mask another's: the 'numpy' leg from
``DetectionArrays`` (what evaluate.predict_dataset hands over: no dict per detection), the
COCO API legs from the list of result dicts they need. Each leg reports the wall time of the
evaluate call (input validation included), the process's peak resident memory (ru_maxrss) and
its resident memory once the set was generated; the legs must give the same metrics (every
headline and per-class number, to 1e-12).

    python benchmarks/eval_speed.py --images 2000 --dets 1500   # the issue's target size
    python benchmarks/eval_speed.py --images 200 --dets 1500 --skip-pycocotools  # quick run

Measured on the project's shared 2-core CPU (Python 3.11, numpy 2.4, faster-coco-eval 1.8.0,
pycocotools 2.0.11): see benchmarks/README.md.

Earlier measurements of the COCO API legs alone (before the array path): ``--images 200 --dets
1500`` (300,000 detections): faster_coco_eval 2.35 s / 2.71 s, pycocotools 31.2 s / 31.8 s;
``--images 2000 --dets 1500`` (3,000,000 detections, 60,000 gt boxes): faster_coco_eval 51.8 s,
pycocotools 332.1 s, metrics identical.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from dfrdet_jax import evaluation

LEGS = ("numpy", "faster_coco_eval", "pycocotools")


def generate(num_images: int, dets_per_image: int, gt_per_image: int, num_classes: int, seed=0):
    """(COCO gt dict, DetectionArrays) with 512x512 images and boxes of 2-48 px sides."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(num_classes)]
    images = [{"id": i + 1, "width": 512, "height": 512} for i in range(num_images)]
    n_gt = num_images * gt_per_image
    gt_wh = rng.uniform(2, 48, (n_gt, 2))
    gt_xy = rng.uniform(0, 460, (n_gt, 2))
    gt_image = np.repeat(np.arange(1, num_images + 1), gt_per_image)
    gt_cat = rng.integers(1, num_classes + 1, n_gt)
    annotations = [
        {
            "id": k + 1,
            "image_id": int(i),
            "category_id": int(c),
            "bbox": [*xy, *wh],
            "area": float(wh[0] * wh[1]),
            "iscrowd": 0,
        }
        for k, (i, c, xy, wh) in enumerate(zip(gt_image, gt_cat, gt_xy.tolist(), gt_wh.tolist()))
    ]
    n_dt = num_images * dets_per_image
    dt_image = np.repeat(np.arange(1, num_images + 1), dets_per_image)
    # A fifth of the detections jitter a ground-truth box of their image, the rest are random.
    source = (dt_image - 1) * gt_per_image + rng.integers(0, gt_per_image, n_dt)
    near = rng.random(n_dt) < 0.2
    xy = np.where(
        near[:, None], gt_xy[source] + rng.normal(0, 1.5, (n_dt, 2)), rng.uniform(0, 460, (n_dt, 2))
    )
    wh = np.where(
        near[:, None],
        np.abs(gt_wh[source] + rng.normal(0, 1.5, (n_dt, 2))),
        rng.uniform(2, 48, (n_dt, 2)),
    )
    cat = np.where(near, gt_cat[source], rng.integers(1, num_classes + 1, n_dt))
    detections = evaluation.DetectionArrays(
        image_ids=dt_image.astype(np.int64),
        category_ids=cat.astype(np.int64),
        boxes=np.concatenate([xy, wh], axis=1),
        scores=rng.random(n_dt),
    )
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _rss_gb(maxrss_kb: int) -> float:
    return maxrss_kb * 1024 / 1e9  # Linux reports ru_maxrss in KiB


def run_leg(args) -> dict:
    """One backend in this process: {'seconds', 'peak_rss_gb', 'input_rss_gb', 'metrics'}
    (peak: the whole process, generation included; input: resident after generating)."""
    gt, detections = generate(args.images, args.dets, args.gt, args.classes)
    if args.leg != "numpy":
        detections = detections.to_coco()  # the COCO API legs score result dicts
    with open("/proc/self/statm") as f:
        input_rss = int(f.read().split()[1]) * resource.getpagesize() / 1e9
    start = time.perf_counter()
    metrics = evaluation.evaluate(gt, detections, protocol="aitod", backend=args.leg)
    seconds = time.perf_counter() - start
    peak = _rss_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"seconds": seconds, "peak_rss_gb": peak, "input_rss_gb": input_rss, "metrics": metrics}


def _floats(metrics: dict) -> dict[str, float]:
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for name, values in metrics["per_class"].items():
        flat.update({f"{name}/{k}": v for k, v in values.items()})
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dets", type=int, default=1500, help="detections per image")
    parser.add_argument("--gt", type=int, default=30, help="ground-truth boxes per image")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--leg", choices=LEGS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", action="store_true", help="end with the timings as a JSON line")
    args = parser.parse_args()
    if args.leg:
        print(json.dumps(run_leg(args)))
        return
    print(
        f"{args.images} images, {args.images * args.dets} detections, "
        f"{args.images * args.gt} gt boxes"
    )
    legs = LEGS[:2] if args.skip_pycocotools else LEGS
    reports = {}
    for leg in legs:
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--leg", leg],
            check=True,
            capture_output=True,
            text=True,
        )
        reports[leg] = json.loads(child.stdout.strip().splitlines()[-1])
        r = reports[leg]
        print(
            f"{leg:>17s}: {r['seconds']:8.2f} s  peak RSS {r['peak_rss_gb']:5.2f} GB "
            f"(after generating the input: {r['input_rss_gb']:5.2f} GB)  "
            f"AP={r['metrics']['AP']:.4f} AP50={r['metrics']['AP50']:.4f}"
        )
    reference = _floats(reports["faster_coco_eval"]["metrics"])
    for leg in legs[::2]:  # numpy and pycocotools against faster_coco_eval
        got = _floats(reports[leg]["metrics"])
        assert got.keys() == reference.keys(), leg
        diff = max(abs(got[k] - reference[k]) for k in reference)
        print(f"max |{leg} - faster_coco_eval| over {len(reference)} metrics: {diff:.2e}")
        if diff > 1e-12:
            raise SystemExit(f"{leg} disagrees with faster_coco_eval by {diff}")
    fast = reports["faster_coco_eval"]["seconds"]
    print(f"numpy speed-up over faster_coco_eval: {fast / reports['numpy']['seconds']:.1f}x")
    if args.json:  # benchmarks/gpu_check.py reads this line
        summary = {
            key: {leg: reports[leg][key] for leg in legs}
            for key in ("seconds", "peak_rss_gb", "input_rss_gb")
        }
        sizes = {"images": args.images, "detections": args.images * args.dets}
        print(json.dumps({**sizes, "gt_boxes": args.images * args.gt, **summary}))


if __name__ == "__main__":
    main()
