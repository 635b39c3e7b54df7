"""Sliced inference: detections on an image of any size, tile by tile at the model's resolution.

The image is decoded once. Tiles of ``tile`` px overlapping by ``overlap`` px (the last row and
column end at the image's far edge, as the DOTA tiles do: ``dota.tile_starts``) are cut, resized
and padded as training resizes its images (``transforms.example_from_record``) and batched one
batch at a time, so memory holds the image and one batch of tiles. Each batch goes through the
jit-compiled model; its boxes are mapped back to image pixels and merged:
  1. a box cut by an inner tile edge (one that is not the image's) is dropped when a whole box of
     its class covers most of it (TRUNCATION_IOS): an object smaller than the overlap is seen
     whole in some tile, and the cut view of it elsewhere is a duplicate that IoU-based NMS
     would not catch (a sliver has a small IoU with the whole box). A cut box that no whole one
     covers (an object larger than the overlap) is kept;
  2. class-wise greedy NMS at ``merge_iou`` (the DOTA merge's ``dota.nms``) removes objects found
     whole in two tiles.
A "whole image" run is the one-tile case: ``tile = max(h, w)`` resizes the image as a batch of
one, exactly the non-tiled inference.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

import numpy as np

from dfrdet_jax.data import transforms
from dfrdet_jax.data.sources import dota as dota_source
from dfrdet_jax.evaluation import dota as dota_eval

# A cut box at least this much inside (intersection over its own area) a whole box of its class
# is that object seen through a tile edge.
TRUNCATION_IOS = 0.5
_BLOCK = 1024  # cut boxes per intersection block: [block, whole boxes] floats at a time


@dataclasses.dataclass
class ImageDetections:
    """Detections of one image in its pixels: boxes float32 [N, 4] (x1, y1, x2, y2), scores
    float32 [N], classes int32 [N] (0-based class index), best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def to_coco(self, image_id: int, category_ids) -> list[dict]:
        """COCO results (bbox [x, y, w, h]) with the data set's category ids."""
        xywh = np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], 1)
        return [
            {"image_id": image_id, "category_id": int(category_ids[c]), "bbox": b, "score": s}
            for b, s, c in zip(xywh.tolist(), self.scores.tolist(), self.classes.tolist())
        ]


def tile_origins(height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """int64 [T, 2]: the (x0, y0) of every tile, row by row; one tile when the image fits."""
    ys = dota_source.tile_starts(height, tile, overlap)
    xs = dota_source.tile_starts(width, tile, overlap)
    return np.array([(x, y) for y, x in itertools.product(ys, xs)], np.int64).reshape(-1, 2)


def tile_batches(
    image: np.ndarray, origins: np.ndarray, tile: int, image_size: int, batch_size: int
) -> Iterator[tuple[dict, int]]:
    """(standard batch of ``batch_size`` tiles, number of real tiles in it) for each batch of
    ``origins``; the last batch is padded with image_id -1 pad images. Tiles carry image_id 0,
    their resize factor as ``scale`` and their origin as ``tile_offset``."""
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int32),
        "ignore": np.zeros(0, bool),
    }
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        records = []
        for x0, y0 in chunk:
            crop = image[y0 : y0 + tile, x0 : x0 + tile]
            record = {"path": "tile", "image": crop, "image_id": 0, "hw": crop.shape[:2]}
            records.append({**record, **empty, "tile_offset": (x0, y0)})
        records += [{"path": None, "image_id": -1, "tile_offset": (0, 0)}] * (
            batch_size - len(chunk)
        )
        examples = [
            transforms.example_from_record(r, image_size, max_boxes=1, flip=False) for r in records
        ]
        yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}, len(chunk)


def cut_by_inner_edge(boxes: np.ndarray, origin, tile_hw, image_hw, tolerance: float) -> np.ndarray:
    """bool [N]: boxes [N, 4] (image px) of the tile at ``origin`` (x0, y0) of size ``tile_hw``
    that reach (within ``tolerance`` px) one of its edges that is not an edge of the image."""
    x0, y0 = origin
    (th, tw), (h, w) = tile_hw, image_hw
    cut = np.zeros(len(boxes), bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + tolerance
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + tolerance
    if x0 + tw < w:
        cut |= boxes[:, 2] >= x0 + tw - tolerance
    if y0 + th < h:
        cut |= boxes[:, 3] >= y0 + th - tolerance
    return cut


def _covered(cut_boxes: np.ndarray, whole_boxes: np.ndarray) -> np.ndarray:
    """bool [M]: cut boxes [M, 4] of which some whole box [K, 4] covers TRUNCATION_IOS or more."""
    covered = np.zeros(len(cut_boxes), bool)
    if not len(whole_boxes):
        return covered
    for start in range(0, len(cut_boxes), _BLOCK):
        a = cut_boxes[start : start + _BLOCK, None, :]
        b = whole_boxes[None, :, :]
        iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
        ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
        area = np.maximum((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]), 1e-9)
        covered[start : start + _BLOCK] = (iw * ih / area >= TRUNCATION_IOS).any(axis=1)
    return covered


def merge_tiles(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, cut: np.ndarray, merge_iou: float
) -> np.ndarray:
    """Indices (best first) of the detections [N] of all tiles of an image that the merge keeps
    (the module docstring's two steps)."""
    kept = []
    for c in np.unique(classes):
        index = np.flatnonzero(classes == c)
        whole, sliced = index[~cut[index]], index[cut[index]]
        index = np.concatenate([whole, sliced[~_covered(boxes[sliced], boxes[whole])]])
        kept.append(index[dota_eval.nms(boxes[index], scores[index], merge_iou)])
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return kept[np.argsort(-scores[kept], kind="stable")]


def detect_image(
    detect: Callable[[dict], object],
    image: np.ndarray,
    *,
    tile: int,
    overlap: int,
    image_size: int,
    batch_size: int,
    merge_iou: float,
    on_tiles: Callable[[int], None] = lambda count: None,
) -> ImageDetections:
    """Detections of ``image`` (uint8 [h, w, 3]) tile by tile.

    detect: standard batch -> detections with numpy ``boxes`` [B, K, 4] (batch pixels),
      ``scores``, ``classes`` and ``valid`` [B, K] (``evaluate.predict_fn``'s first output).
    on_tiles: called with the number of tiles of each batch done (a progress bar).
    """
    h, w = image.shape[:2]
    origins = tile_origins(h, w, tile, overlap)
    found = {"boxes": [], "scores": [], "classes": [], "cut": []}
    for batch, count in tile_batches(image, origins, tile, image_size, batch_size):
        detections = detect(batch)
        for i in range(count):
            valid, scale = detections.valid[i], float(batch["scale"][i])
            origin = batch["tile_offset"][i]
            boxes = detections.boxes[i][valid] / scale + np.tile(origin, 2)
            # The resized tile's valid region is rounded to whole pixels: clip what it adds.
            boxes = np.clip(boxes, 0, [w, h, w, h])
            tile_hw = (min(tile, h), min(tile, w))
            found["boxes"].append(boxes.astype(np.float32))
            found["scores"].append(detections.scores[i][valid])
            found["classes"].append(detections.classes[i][valid])
            found["cut"].append(cut_by_inner_edge(boxes, origin, tile_hw, (h, w), 1.0 / scale))
        on_tiles(count)
    boxes, scores, classes, cut = (np.concatenate(found[k]) for k in found)
    if len(origins) == 1:  # one tile: nothing to merge
        keep = np.argsort(-scores, kind="stable")
    else:
        keep = merge_tiles(boxes, scores, classes, cut, merge_iou)
    return ImageDetections(
        boxes[keep], scores[keep].astype(np.float32), classes[keep].astype(np.int32)
    )
