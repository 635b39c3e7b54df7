"""Tiny-object detection metrics: AI-TOD (COCO API with tiny area ranges), TinyPerson (ignore
regions, tiny size ranges, miss rate) and DOTA-v2.0 horizontal boxes (tile merging, then VOC
AP50 or the AI-TOD metrics).

    metrics = evaluate("ann.json", "results.json", protocol="aitod")
    print(format_table(metrics))

or ``python -m dfrdet_jax.evaluation --gt ann.json --dt results.json --protocol aitod``.
``detection_arrays`` turns batched model outputs into COCO results in original-image pixels, as
``DetectionArrays`` (which ``evaluate`` scores without a dict per detection); ``detections_to_coco``
into COCO result dicts.
"""

from dfrdet_jax.evaluation.api import PROTOCOLS, evaluate, format_table, lower_is_better
from dfrdet_jax.evaluation.results import (
    DetectionArrays,
    EvaluationInputError,
    detection_arrays,
    detections_to_coco,
)

__all__ = [
    "PROTOCOLS",
    "DetectionArrays",
    "EvaluationInputError",
    "detection_arrays",
    "detections_to_coco",
    "evaluate",
    "format_table",
    "lower_is_better",
]
