"""Target assignment on the host (numpy), over only the location x box pairs that overlap:
RetinaNet's and the RPN's max-IoU anchor matching (``AnchorMatcher``) and FCOS's point assignment
(``PointAssigner``), each the same assignment as its device twin in ``ops.matcher`` /
``ops.fcos_assign`` (tested against them).

The device versions score every location x box-slot pair: [A, N] arrays whose cost follows the
padded slots (at 128 px, 12,276 anchors x 128 slots, most of RetinaNet's step on a CPU). Here
each image is assigned in the input pipeline instead: anchors and points lie on regular grids,
so the locations a box can reach are, per level (and anchor shape), a rectangle of cells found
arithmetically (``GridWindows``). Only those pairs are scored, so the work follows the image's
real boxes and their sizes, and it runs in the pipeline, beside the device step.

Locations no box reaches get what the dense rules give them: for the matcher, max IoU 0 and the
first assignable box, also in the settings where zero-overlap anchors matter (``positive_iou``
or ``ignore_iof`` at 0, a box whose best IoU is within the tie tolerance of 0).

Both return one int32 code per location: the slot of its box when positive, else
``BACKGROUND`` or ``IGNORED``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dfrdet_jax.ops import anchors as anchors_ops
from dfrdet_jax.ops.boxes import EPS
from dfrdet_jax.ops.matcher import TIE_TOLERANCE, check_iou_thresholds
from dfrdet_jax.ops.points import fcos_flat_points

# Location codes besides a box slot (>= 0).
BACKGROUND = -1
IGNORED = -2
# px of slack in the search windows: locations are float32, whose rounding (about 1e-4 px at
# 2,000 px) must not put an overlapping location outside its box's window.
_WINDOW_MARGIN = 0.05


class GridWindows:
    """Locations on G regular grids, numbered as one flat array: grid g has h x w cells of
    ``stride`` px, centred at ((j + 0.5) * stride, (i + 0.5) * stride), whose location index is
    first + (i * w + j) * step, each reaching half_w / half_h px from its centre (anchors: half
    their size; points: 0)."""

    def __init__(self, grids: Sequence[tuple[int, int, int, int, int, float, float]]):
        """grids: (h, w, stride, first, step, half_w, half_h) per grid."""
        columns = np.array(grids, np.float64).T[:, :, None]  # [7, G, 1] against boxes [N]
        self.grid_h, self.grid_w, self.stride, self.first, self.step = columns[:5].astype(np.int64)
        self.half_w, self.half_h = columns[5:]

    def pairs(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(box index, location index) int64 [P] of every location whose reach overlaps a box
        of ``boxes`` [N, 4] xyxy px with positive area, and some that only touch it: the cells
        whose centres lie within the reach of the box, ``_WINDOW_MARGIN`` px of slack."""
        x1, y1, x2, y2 = boxes.astype(np.float64).T
        # Centre (j + 0.5) * stride reaches (x1, x2) iff it lies in (x1 - half, x2 + half).
        j0, j1 = _cell_range(x1 - self.half_w, x2 + self.half_w, self.stride, self.grid_w)
        i0, i1 = _cell_range(y1 - self.half_h, y2 + self.half_h, self.stride, self.grid_h)
        nj = np.maximum(j1 - j0, 0).reshape(-1)
        cells = np.maximum(i1 - i0, 0).reshape(-1) * nj  # [G * N]
        window = np.repeat(np.arange(len(cells)), cells)
        offset = np.arange(len(window)) - np.repeat(np.cumsum(cells) - cells, cells)
        grid, box = np.divmod(window, len(boxes))
        cell = (i0.reshape(-1)[window] + offset // nj[window]) * self.grid_w[grid, 0]
        cell += j0.reshape(-1)[window] + offset % nj[window]
        return box, self.first[grid, 0] + cell * self.step[grid, 0]


class AnchorMatcher:
    """The anchors of one input size (``anchors.anchor_grid``'s layout) and the max-IoU rule's
    settings (see ``ops.matcher.max_iou_targets``); calling it assigns one image's boxes.

    A plain, picklable object: the input pipeline's worker processes each hold a copy.
    """

    def __init__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        *,
        octave_base_scale: float,
        scales_per_octave: int,
        aspect_ratios: Sequence[float],
        positive_iou: float,
        negative_iou: float,
        low_quality_matches: bool,
        ignore_iof: float,
    ):
        check_iou_thresholds(negative_iou, positive_iou, "AnchorMatcher")
        self.anchors, _ = anchors_ops.anchor_grid(
            feature_sizes,
            strides,
            octave_base_scale=octave_base_scale,
            scales_per_octave=scales_per_octave,
            aspect_ratios=aspect_ratios,
        )
        self.corners = tuple(np.ascontiguousarray(c) for c in self.anchors.T)  # x1, y1, x2, y2
        self.anchor_area = _area(self.corners)
        # One grid per level and anchor shape: K anchors a cell, the shape's k-th first.
        grids = []
        start = 0
        for (h, w), stride in zip(feature_sizes, strides, strict=True):
            shapes = anchors_ops.anchor_shapes(
                stride, octave_base_scale, scales_per_octave, aspect_ratios
            )
            for k, (width, height) in enumerate(shapes.astype(np.float64)):
                grids.append((h, w, stride, start + k, len(shapes), width / 2, height / 2))
            start += h * w * len(shapes)
        self.windows = GridWindows(grids)
        self.positive_iou, self.negative_iou = positive_iou, negative_iou
        self.low_quality_matches, self.ignore_iof = low_quality_matches, ignore_iof

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def __call__(
        self,
        boxes: np.ndarray,
        valid: np.ndarray,
        ignore: np.ndarray,
    ) -> np.ndarray:
        """One image's assignment as int32 [A]: the matched box's slot index for a positive
        anchor, ``BACKGROUND`` (-1) or ``IGNORED`` (-2); the same positives, matched boxes,
        background and ignored anchors as ``ops.matcher.max_iou_targets``.

        Args:
          boxes: float32 [N, 4] xyxy px; valid: bool [N], False rows are padding;
          ignore: bool [N], ignore regions.
        """
        num_gt = boxes.shape[0]
        boxes, assignable, regions = _split_ground_truth("AnchorMatcher", boxes, valid, ignore)
        box_of, anchor_of = _valid_pairs(self.windows, boxes, assignable | regions)
        inter = _intersection(
            [corner[anchor_of] for corner in self.corners],
            [corner[box_of] for corner in boxes.T],
        )
        # Pairs that do not overlap score IoU 0 and IoF 0, as the anchors outside every window:
        # the defaults below give those what the dense rule gives them.
        keep = inter > 0
        box_of, anchor_of, inter = box_of[keep], anchor_of[keep], inter[keep]
        anchor_area = self.anchor_area[anchor_of]

        # Ignore regions: intersection over the anchor's area (every anchor when ignore_iof <= 0,
        # as the dense rule counts zero overlaps too).
        in_ignore = np.full(self.num_anchors, self.ignore_iof <= 0 and regions.any())
        region_pair = regions[box_of]
        iof = inter[region_pair] / np.maximum(anchor_area[region_pair], np.float32(1e-6))
        in_ignore[anchor_of[region_pair][iof >= self.ignore_iof]] = True

        # Max IoU over the assignable boxes: 0 for anchors they do not reach (-1 without any).
        pair = assignable[box_of]
        box_of, anchor_of = box_of[pair], anchor_of[pair]
        box_area = _area(boxes.T)[box_of]
        iou = inter[pair] / (anchor_area[pair] + box_area - inter[pair] + np.float32(EPS))
        any_assignable = assignable.any()
        max_iou = np.full(self.num_anchors, 0.0 if any_assignable else -1.0, np.float32)
        np.maximum.at(max_iou, anchor_of, iou)
        # The first box with the anchor's max IoU (the first assignable one when that is 0).
        first = int(np.argmax(assignable)) if any_assignable else 0
        gt_index = np.full(self.num_anchors, num_gt, np.int64)
        at_max = iou == max_iou[anchor_of]
        np.minimum.at(gt_index, anchor_of[at_max], box_of[at_max])
        gt_index = np.where(max_iou > 0, gt_index, first)

        positive = max_iou >= self.positive_iou
        if self.low_quality_matches:
            box_best = np.zeros(max(num_gt, 1), np.float32)
            np.maximum.at(box_best, box_of, iou)
            threshold = box_best - np.float32(TIE_TOLERANCE)
            if np.any(assignable & (box_best > 0) & (threshold <= 0)):
                positive[:] = True  # a best IoU within the tolerance of 0: IoU 0 ties it
            best = (box_best[box_of] > 0) & (iou >= threshold[box_of])
            positive[anchor_of[best]] = True
        background = ~positive & (max_iou < self.negative_iou) & ~in_ignore
        return np.where(positive, gt_index, np.where(background, BACKGROUND, IGNORED)).astype(
            np.int32
        )


class PointAssigner:
    """The FCOS points of one input size (``points.fcos_flat_points``' order) and the assignment
    settings of ``ops.fcos_assign.fcos_targets``; calling it assigns one image's boxes.

    A plain, picklable object: the input pipeline's worker processes each hold a copy.
    """

    def __init__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        *,
        regress_ranges,
        center_sampling: bool,
        center_radius: float,
    ):
        points, self.level = fcos_flat_points(feature_sizes, strides)
        self.px, self.py = (np.ascontiguousarray(c) for c in points.T)
        self.ranges = np.asarray(regress_ranges, np.float32)
        if self.ranges.shape != (len(strides), 2):
            raise ValueError(
                f"PointAssigner: regress_ranges {self.ranges.shape} must be "
                f"[{len(strides)}, 2], one per stride"
            )
        self.strides = np.asarray(strides, np.float32)
        self.center_sampling, self.center_radius = center_sampling, np.float32(center_radius)
        grids, start = [], 0
        for (h, w), stride in zip(feature_sizes, strides, strict=True):
            grids.append((h, w, stride, start, 1, 0.0, 0.0))
            start += h * w
        self.windows = GridWindows(grids)

    @property
    def num_points(self) -> int:
        return len(self.level)

    def __call__(self, boxes: np.ndarray, valid: np.ndarray, ignore: np.ndarray) -> np.ndarray:
        """One image's assignment as int32 [P]: the assigned box's slot for a positive point,
        ``BACKGROUND`` (-1) or ``IGNORED`` (-2); the same positives, boxes and ignored points as
        ``ops.fcos_assign.fcos_targets``.

        Args:
          boxes: float32 [N, 4] xyxy px; valid: bool [N], False rows are padding;
          ignore: bool [N], ignore regions.
        """
        boxes, assignable, regions = _split_ground_truth("PointAssigner", boxes, valid, ignore)
        box_of, point_of = _valid_pairs(self.windows, boxes, assignable | regions)
        x1, y1, x2, y2 = (corner[box_of] for corner in boxes.T)
        px, py = self.px[point_of], self.py[point_of]
        ltrb = (px - x1, py - y1, x2 - px, y2 - py)
        inside = np.minimum(np.minimum(ltrb[0], ltrb[1]), np.minimum(ltrb[2], ltrb[3])) > 0
        box_of, point_of = box_of[inside], point_of[inside]
        x1, y1, x2, y2, px, py = (a[inside] for a in (x1, y1, x2, y2, px, py))
        ltrb = tuple(d[inside] for d in ltrb)

        ignored = np.zeros(self.num_points, bool)
        ignored[point_of[regions[box_of]]] = True  # strictly inside an ignore region

        level = self.level[point_of]
        if self.center_sampling:  # strictly inside the centre region, clipped to the box
            radius = self.strides[level] * self.center_radius
            cx, cy = np.float32(0.5) * (x1 + x2), np.float32(0.5) * (y1 + y2)
            in_region = np.minimum(
                np.minimum(px - np.maximum(cx - radius, x1), py - np.maximum(cy - radius, y1)),
                np.minimum(np.minimum(cx + radius, x2) - px, np.minimum(cy + radius, y2) - py),
            )
            inside = in_region > 0
        else:
            inside = np.ones(len(box_of), bool)
        max_dist = np.maximum(np.maximum(ltrb[0], ltrb[1]), np.maximum(ltrb[2], ltrb[3]))
        lo, hi = self.ranges[level, 0], self.ranges[level, 1]
        candidate = inside & (max_dist >= lo) & (max_dist <= hi) & assignable[box_of]
        box_of, point_of = box_of[candidate], point_of[candidate]

        # The candidate of smallest area, ties to the lower slot.
        area = _area(boxes.T)[box_of]
        best_area = np.full(self.num_points, np.inf, np.float32)
        np.minimum.at(best_area, point_of, area)
        slot = np.full(self.num_points, len(boxes), np.int64)
        smallest = area == best_area[point_of]
        np.minimum.at(slot, point_of[smallest], box_of[smallest])
        positive = np.zeros(self.num_points, bool)
        positive[point_of] = True
        codes = np.where(positive, slot, np.where(ignored, IGNORED, BACKGROUND))
        return codes.astype(np.int32)


def _split_ground_truth(caller: str, boxes, valid, ignore):
    """(boxes float32 [N, 4], assignable bool [N], ignore regions bool [N]) of one image, as
    ``ops.ground_truth.split_ground_truth``; ValueError naming ``caller`` for other lengths."""
    for name, arr in (("valid", valid), ("ignore", ignore)):
        if np.shape(arr) != (np.shape(boxes)[0],):
            raise ValueError(
                f"{caller}: {name} {np.shape(arr)} does not match boxes {np.shape(boxes)}"
            )
    valid, ignore = np.asarray(valid, bool), np.asarray(ignore, bool)
    return np.asarray(boxes, np.float32), valid & ~ignore, valid & ignore


def _valid_pairs(windows: GridWindows, boxes: np.ndarray, valid: np.ndarray):
    """``windows.pairs`` of the ``valid`` rows of ``boxes``, their indices into ``boxes``
    (padding rows get no pairs)."""
    rows = np.flatnonzero(valid)
    box_of, location_of = windows.pairs(boxes[rows])
    return rows[box_of], location_of


def _cell_range(low: np.ndarray, high: np.ndarray, stride: int, cells: int):
    """int64 [N] first and end (exclusive) cell of a level row of ``cells`` whose centres
    (j + 0.5) * stride lie in (low, high) px, widened by ``_WINDOW_MARGIN``, clipped."""
    first = np.floor((low - _WINDOW_MARGIN) / stride - 0.5) + 1
    end = np.ceil((high + _WINDOW_MARGIN) / stride - 0.5)
    return np.clip(first, 0, cells).astype(np.int64), np.clip(end, 0, cells).astype(np.int64)


def _area(corners) -> np.ndarray:
    """float32 [P] areas of boxes given as their corner arrays (x1, y1, x2, y2), each [P], as
    ``ops.boxes.box_area``."""
    x1, y1, x2, y2 = corners
    return np.maximum(x2 - x1, np.float32(0)) * np.maximum(y2 - y1, np.float32(0))


def _intersection(a, b) -> np.ndarray:
    """float32 [P] intersection areas of paired boxes given as corner arrays (each [P]), as
    ``ops.boxes.pairwise_intersection``."""
    w = np.maximum(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]), np.float32(0))
    h = np.maximum(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]), np.float32(0))
    return w * h
