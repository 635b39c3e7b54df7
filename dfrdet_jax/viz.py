"""Pictures: detections drawn on images (predict mode), and the figures of ``--mode viz``
(dfrdet_jax/figures.py): true / false positives and misses by size, feature saliency, the DFR
reconstruction, training curves and precision-recall curves. Pure functions of arrays and files;
each writes one PNG.
"""

from __future__ import annotations

import json
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# AI-TOD's size classes by sqrt(area) in px (evaluation.coco_tiny.AITOD_AREA_RANGES), and the
# colour each is drawn in.
SIZE_CLASSES = (("very tiny", 0.0, 8.0), ("tiny", 8.0, 16.0), ("small", 16.0, 32.0),
                ("medium", 32.0, float("inf")))  # fmt: skip
SIZE_COLOURS = ((255, 64, 64), (255, 200, 0), (64, 220, 64), (64, 160, 255))

# One colour per class index, cycled.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def draw_detections(
    image: np.ndarray,
    results: Sequence[dict],
    class_names: Sequence[str],
    out_path: str,
    category_ids: Sequence[int],
    min_score: float = 0.3,
) -> None:
    """Writes ``image`` (uint8 [h, w, 3]) with the COCO-format ``results`` of score >=
    ``min_score`` drawn (box outline in the class colour, label and score above it) to
    ``out_path``."""
    index_of = {cat: i for i, cat in enumerate(category_ids)}
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for result in results:
        if result["score"] < min_score:
            continue
        index = index_of[result["category_id"]]
        x, y, w, h = result["bbox"]
        colour = PALETTE[index % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=1)
        draw.text((x, max(y - 10, 0)), f"{class_names[index]} {result['score']:.2f}", fill=colour)
    canvas.save(out_path)


def size_class(boxes: np.ndarray) -> np.ndarray:
    """int [N]: the SIZE_CLASSES index of each box [N, 4] (x1, y1, x2, y2 px) by sqrt(area)."""
    side = np.sqrt(
        np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    )
    edges = [upper for _, _, upper in SIZE_CLASSES[:-1]]
    return np.searchsorted(edges, side, side="right")


def match_detections(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(true positive bool [D], found bool [G]): detections, best score first, each take the
    unmatched ground-truth box of their class with the highest IoU >= ``iou_threshold`` (as
    COCOeval matches one image)."""
    tp, found = np.zeros(len(boxes), bool), np.zeros(len(gt_boxes), bool)
    if not len(boxes) or not len(gt_boxes):
        return tp, found
    lt = np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda b: np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)  # noqa: E731
    iou = inter / np.maximum(area(boxes)[:, None] + area(gt_boxes)[None] - inter, 1e-9)
    iou = np.where(classes[:, None] == gt_classes[None], iou, 0.0)
    for d in np.argsort(-scores, kind="stable"):
        candidates = np.where(found, -1.0, iou[d])
        g = int(np.argmax(candidates))
        if candidates[g] >= iou_threshold:
            tp[d], found[g] = True, True
    return tp, found


def _upscaled(image: np.ndarray, factor: int) -> Image.Image:
    return Image.fromarray(image).resize(
        (image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST
    )


def draw_outcomes(
    image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    out_path: str,
    iou_threshold: float = 0.5,
    min_score: float = 0.3,
    upscale: int = 3,
) -> dict[str, int]:
    """Three panels of ``image`` (uint8 [h, w, 3]): true positives, false positives and misses
    (ground truth no detection of score >= ``min_score`` found at ``iou_threshold``), every box
    outlined in the colour of its size class (SIZE_COLOURS), the image scaled ``upscale`` times
    so that boxes of a few pixels show. Returns the counts {'tp', 'fp', 'missed'}."""
    shown = scores >= min_score
    boxes, scores, classes = boxes[shown], scores[shown], classes[shown]
    tp, found = match_detections(gt_boxes, gt_classes, boxes, scores, classes, iou_threshold)
    panels = {
        "true positives": boxes[tp],
        "false positives": boxes[~tp],
        "misses": gt_boxes[~found],
    }
    drawn = []
    for title, panel_boxes in panels.items():
        canvas = _upscaled(image, upscale)
        draw = ImageDraw.Draw(canvas)
        for box, size in zip(panel_boxes, size_class(panel_boxes)):
            draw.rectangle(list(box * upscale), outline=SIZE_COLOURS[size], width=2)
        draw.text((4, 4), f"{title}: {len(panel_boxes)}", fill=(255, 255, 255))
        drawn.append(np.asarray(canvas))
    legend = Image.new("RGB", (sum(p.shape[1] for p in drawn), 16), (0, 0, 0))
    draw = ImageDraw.Draw(legend)
    for i, ((name, _, _), colour) in enumerate(zip(SIZE_CLASSES, SIZE_COLOURS)):
        draw.text((4 + 90 * i, 2), name, fill=colour)
    strip = np.concatenate(drawn, axis=1)
    Image.fromarray(np.concatenate([strip, np.asarray(legend)], axis=0)).save(out_path)
    return {"tp": int(tp.sum()), "fp": int((~tp).sum()), "missed": int((~found).sum())}


def to_uint8(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to 0-255 by its own minimum and maximum (a constant array -> 0)."""
    x = np.asarray(x, np.float32)
    return np.uint8(255 * (x - x.min()) / max(float(x.max() - x.min()), 1e-6))


def saliency(feature_map: np.ndarray) -> np.ndarray:
    """float [h, w] in [0, 1]: the mean |activation| over the channels of [h, w, C]."""
    return to_uint8(np.abs(np.asarray(feature_map, np.float32)).mean(-1)) / 255.0


def draw_saliency(image: np.ndarray, maps: dict[str, np.ndarray], out_path: str) -> None:
    """``image`` beside each saliency map [h, w] of ``maps`` (title -> map), in the 'inferno'
    colour map, scaled to the image's size (as the paper's Fig. 5 shows P2)."""
    height, width = image.shape[:2]
    panels = [image]
    for heat in maps.values():
        coloured = np.uint8(255 * plt.get_cmap("inferno")(heat)[..., :3])
        panels.append(np.asarray(Image.fromarray(coloured).resize((width, height), Image.BILINEAR)))
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for axis, panel, title in zip(np.atleast_1d(axes), panels, ["image", *maps]):
        axis.imshow(panel)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def draw_reconstruction(
    image: np.ndarray, mask: np.ndarray, target: np.ndarray, reconstruction: np.ndarray,
    out_path: str, upscale: int = 2,
) -> None:  # fmt: skip
    """Side by side: the image, the foreground mask M [h, w], the target M * X and the DFR
    decoder's reconstruction phi(F) (both [h, w, 3], each scaled by its own range)."""
    panels = [image, to_uint8(np.repeat(mask[..., None], 3, -1)), to_uint8(target),
              to_uint8(reconstruction)]  # fmt: skip
    _upscaled(np.concatenate(panels, axis=1), upscale).save(out_path)


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one JSON object per line: 'step' and metrics)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(runs: dict[str, str], out_path: str) -> None:
    """Every training loss part and the validation AP over steps, one line per run of ``runs``
    (label -> metrics.jsonl path), one panel per metric."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for label, path in runs.items():
        for record in read_metrics(path):
            for key, value in record.items():
                is_loss = key.startswith("train/") and "loss" in key
                if (is_loss or key == "eval/AP") and isinstance(value, (int, float)):
                    steps, values = series.setdefault(key, {}).setdefault(label, ([], []))
                    steps.append(record["step"])
                    values.append(value)
    names = sorted(series, key=lambda k: (k == "eval/AP", k))
    columns = min(3, max(len(names), 1))
    rows = max(-(-len(names) // columns), 1)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        for label, (steps, values) in series[name].items():
            axis.plot(steps, values, label=label, marker="o" if len(steps) < 10 else None)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    for axis in axes.flat[len(names) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def plot_pr_curves(recall: np.ndarray, curves: dict[str, np.ndarray], out_path: str) -> None:
    """Precision over recall, one line per size class (area label -> precision; -1: no ground
    truth of that size, left out)."""
    figure, axis = plt.subplots(figsize=(5, 4))
    for label, precision in curves.items():
        if (precision >= 0).any():
            axis.plot(recall, precision, label=label)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
