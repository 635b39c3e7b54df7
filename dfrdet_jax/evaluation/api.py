"""``evaluate``: score COCO-format detections with a tiny-object protocol; ``format_table``."""

from __future__ import annotations

from typing import Any

from dfrdet_jax.choices import check_choice
from dfrdet_jax.evaluation import coco_tiny, dota, results, tinyperson

PROTOCOLS = ("aitod", "tinyperson", "dota", "dota_aitod")
# The COCOeval backend each protocol uses unless told otherwise: the array path for the AI-TOD
# metrics (coco_tiny.DEFAULT_BACKEND: exact and fastest); TinyPerson keeps faster_coco_eval, its
# backend since it was checked against the official tables. 'dota' is scored by dota.py.
DEFAULT_BACKENDS = {
    "aitod": coco_tiny.DEFAULT_BACKEND,
    "dota_aitod": coco_tiny.DEFAULT_BACKEND,
    "tinyperson": "faster_coco_eval",
    "dota": "numpy",
}
# Metrics for which lower is better: oLRP and its parts (AI-TOD), the miss rates (TinyPerson).
LOWER_IS_BETTER = ("oLRP", "MR")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (a name ``evaluate`` returns) is the better one."""
    return metric.startswith(LOWER_IS_BETTER)


def evaluate(
    gt: results.GroundTruth,
    detections: results.Detections,
    protocol: str = "aitod",
    backend: str | None = None,
) -> dict[str, Any]:
    """Metrics of ``detections`` against ``gt``.

    Args:
      gt: COCO ground truth, a JSON path or a dict (not modified).
      detections: COCO results (image_id, category_id, bbox [x, y, w, h] in original-image px,
        score): a JSON path, a list of dicts or results.DetectionArrays (the model's outputs,
        scored without a dict per detection by the 'numpy' backend); none scores 0.
      protocol: 'aitod' (AP, AP50, AP75, AP_vt/t/s/m, AR@1/100/300/1500, AR_vt/t/s/m, and
        the official evaluator's oLRP, oLRP_loc, oLRP_FP, oLRP_FN: lower is better),
        'tinyperson' (AP{25,50,75}_{all,tiny,tiny1,tiny2,tiny3,small,reasonable}, AR{25,50,75}_*,
        MR{25,50,75}_{tiny1,tiny2,tiny3,tiny,small,all}), 'dota' (VOC mAP50 after merging
        tile predictions with class-wise NMS) or 'dota_aitod' (the paper's Table 3: the same
        merge, then the 'aitod' metrics of the full images; difficult objects count as ground
        truth, as in COCO-format DOTA, where the COCO API reads no 'ignore' field).
      backend: for the COCOeval protocols 'numpy' (array_cocoeval.py), 'faster_coco_eval'
        (C++) or 'pycocotools'; all give the same numbers. None: the protocol's
        DEFAULT_BACKENDS entry. 'dota' is scored by dota.py whatever the backend (reported as
        'numpy'), as is TinyPerson's MR.
    Returns:
      JSON-serialisable dict: headline metrics as top-level floats in [0, 1] (-1 where no
      ground truth exists for them), 'per_class' {category name: metrics}, 'summary' (lines for
      printing), 'protocol', 'backend', 'num_images', 'num_detections' and 'skipped' counts.
    Raises:
      results.EvaluationInputError (a ValueError) for bad input, naming the offending record.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    backend = DEFAULT_BACKENDS[protocol] if backend is None else backend
    check_choice("evaluation backend", backend, coco_tiny.BACKENDS)
    gt_data, skipped = results.load_ground_truth(gt)
    dets = results.load_detections(detections, gt_data)
    if protocol == "aitod":
        metrics = coco_tiny.evaluate_aitod(gt_data, dets, backend=backend)
    elif protocol == "tinyperson":
        metrics = tinyperson.evaluate_tinyperson(gt_data, dets, backend=backend)
    elif protocol == "dota_aitod":
        merged = dota.merge_tile_detections(results.coco_results(dets))
        metrics = {
            **coco_tiny.evaluate_aitod(
                gt_data, results.load_detections(merged, gt_data), backend=backend
            ),
            "merged_detections": len(merged),
        }
    else:
        metrics = dota.evaluate_dota(gt_data, results.coco_results(dets))
        backend = "numpy"
    return {
        **metrics,
        "protocol": protocol,
        "backend": backend,
        "num_images": len(gt_data["images"]),
        "num_detections": len(dets),
        "skipped": skipped,
    }


def format_table(metrics: dict[str, Any]) -> str:
    """Printable report of ``evaluate``'s output: summary lines, then a per-class table."""
    per_class = metrics.get("per_class", {})
    lines = [
        (
            f"protocol={metrics.get('protocol')} backend={metrics.get('backend')} "
            f"images={metrics.get('num_images')} detections={metrics.get('num_detections')}"
        ),
        *metrics.get("summary", []),
    ]
    if per_class:
        columns = list(next(iter(per_class.values())))
        if metrics.get("protocol") == "tinyperson":
            columns = [c for c in columns if c.startswith("AP50_")]
        width = max(5, *(len(name) for name in per_class))
        lines.append("")
        widths = [max(8, len(c)) for c in columns]
        lines.append(
            f"{'class':<{width}s} " + " ".join(f"{c:>{w}s}" for c, w in zip(columns, widths))
        )
        for name, values in per_class.items():
            cells = " ".join(f"{values[c]:{w}.4f}" for c, w in zip(columns, widths))
            lines.append(f"{name:<{width}s} {cells}")
    skipped = {k: v for k, v in metrics.get("skipped", {}).items() if v}
    if skipped:
        lines.append(f"skipped: {skipped}")
    return "\n".join(lines)
