"""AI-TOD evaluation speed: pycocotools COCOeval vs the faster_coco_eval backend.

Generates a random COCO set (tiny boxes, near-duplicate and background detections), checks
that both backends give the same metrics to 1e-4, and prints the wall time of each
``evaluation.evaluate(..., protocol='aitod')`` call (input validation included).

    python benchmarks/eval_speed.py --images 2000 --dets 1500   # the issue's target size
    python benchmarks/eval_speed.py --images 200 --dets 1500    # quick run

Measured with ``--images 200 --dets 1500`` (defaults --gt 30 --classes 8: 300,000 detections)
on a shared 2-core CPU, Python 3.11, numpy 2.4, pycocotools 2.0.11, faster-coco-eval 1.8.0,
two runs: faster_coco_eval 2.35 s / 2.71 s, pycocotools 31.2 s / 31.8 s (11.7-13.3x), metrics
identical (max difference 0).

Measured with ``--images 2000 --dets 1500`` (3,000,000 detections, 60,000 gt boxes) on the same
machine: faster_coco_eval 51.8 s, pycocotools 332.1 s (6.4x), metrics identical (max
difference 0); the faster_coco_eval leg shared the CPU with another job for about a minute.
Input validation of the 3 M result dicts is part of both timings.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dfrdet_jax import evaluation


def generate(num_images: int, dets_per_image: int, gt_per_image: int, num_classes: int, seed=0):
    """(COCO gt dict, results list) with 512x512 images and boxes of 2-48 px sides."""
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
    scores = rng.random(n_dt)
    results = [
        {"image_id": int(i), "category_id": int(c), "bbox": [*p, *s], "score": float(v)}
        for i, c, p, s, v in zip(dt_image, cat, xy.tolist(), wh.tolist(), scores)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dets", type=int, default=1500, help="detections per image")
    parser.add_argument("--gt", type=int, default=30, help="ground-truth boxes per image")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--json", action="store_true", help="end with the timings as a JSON line")
    args = parser.parse_args()
    gt, dets = generate(args.images, args.dets, args.gt, args.classes)
    print(f"{args.images} images, {len(dets)} detections, {len(gt['annotations'])} gt boxes")
    backends = ["faster_coco_eval"] + ([] if args.skip_pycocotools else ["pycocotools"])
    metrics, seconds = {}, {}
    for backend in backends:
        start = time.perf_counter()
        metrics[backend] = evaluation.evaluate(gt, dets, protocol="aitod", backend=backend)
        seconds[backend] = time.perf_counter() - start
        print(
            f"{backend:>17s}: {seconds[backend]:8.2f} s  AP={metrics[backend]['AP']:.4f} "
            f"AP50={metrics[backend]['AP50']:.4f}"
        )
    if len(backends) == 2:
        fast, slow = metrics["faster_coco_eval"], metrics["pycocotools"]
        diff = max(abs(fast[k] - slow[k]) for k in fast if isinstance(fast[k], float))
        print(f"max |difference| of headline metrics: {diff:.2e}")
        print(f"speed-up: {seconds['pycocotools'] / seconds['faster_coco_eval']:.1f}x")
    if args.json:
        summary = {"images": args.images, "detections": len(dets), "seconds": seconds}
        print(json.dumps({**summary, "gt_boxes": len(gt["annotations"])}))


if __name__ == "__main__":
    main()
