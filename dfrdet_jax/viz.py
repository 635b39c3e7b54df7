"""Drawing detections on images (predict mode)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

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
