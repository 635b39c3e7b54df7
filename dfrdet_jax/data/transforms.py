"""Per-image transforms to the standard batch: decode, aspect-preserving resize, flip, pad.

THE BATCH every model consumes (stacked by the pipeline over B images; N = max_boxes, or in
training the bucket of ``box_slots`` that holds the batch's boxes):
  image      uint8   [B, H, W, 3]  padded image (H = W = image_size), valid region top-left
  boxes      float32 [B, N, 4]     (x1, y1, x2, y2) pixels of the padded/resized image; 0 pad
  labels     int32   [B, N]        class index in [0, num_classes), -1 for padding
  box_valid  bool    [B, N]        real rows (ground truth and ignore regions)
  ignore     bool    [B, N]        True for ignore regions (TinyPerson), which are NOT ground truth
  image_id   int64   [B]           id in the COCO json; -1 for pad images of a final eval batch
  image_hw   int32   [B, 2]        (h, w) of the valid region after resize, before padding
  scale      float32 [B]           resize factor: resized = original * scale
  tile_offset float32 [B, 2]       (DOTA only) (x, y) of the tile in the full image
"""

from collections.abc import Callable

import numpy as np
from PIL import Image

from dfrdet_jax.data.errors import DataError

# DOTA-v2.0 holds aerial images of up to about 29,000 x 27,000 px (0.8 Gpx), past PIL's guard
# against decompression bombs (an error above 0.18 Gpx). Allow 1 Gpx; never lower a set limit.
MAX_IMAGE_PIXELS = 1_000_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# What PIL raises for a file it cannot read (the guard's error is no OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


# 16-bit greyscale, which PIL's convert("RGB") saturates (every value above 255 turns white):
# scaled to 8 bits here. 32-bit integer ("I") and float ("F") pixels have no fixed range: refused.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
RANGELESS_MODES = ("I", "F")


def _refuse_rangeless(path: str, mode: str) -> None:
    if mode in RANGELESS_MODES:
        raise DataError(
            f"{path}: {mode!r} pixels (32-bit integer or float) have no fixed range to map to "
            "8 bits; convert the image to 8- or 16-bit"
        )


def decode_image(path: str) -> np.ndarray:
    """uint8 [h, w, 3] RGB pixels of an image file (16-bit greyscale scaled to 8 bits: 65535 ->
    255); DataError naming the file if unreadable or of pixels without a fixed range."""
    try:
        with Image.open(path) as im:
            _refuse_rangeless(path, im.mode)
            if im.mode in SIXTEEN_BIT_MODES:
                grey = np.asarray(im).astype(np.uint32)
                grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))
    except UNREADABLE_IMAGE_ERRORS as e:
        raise DataError(
            f"{path}: cannot read image: {e} (config.data.verify_images=True finds such files "
            "before training; config.data.lenient=True then skips and counts them)"
        ) from e


class LastImageDecoder:
    """``decode_image`` that keeps the last image it decoded, so the consecutive tiles of one
    large image (DOTA, read in order for evaluation) decode it once instead of once per tile.

    Holds one image at a time (the previous one is freed before the next is decoded) and is
    pickled empty: each grain worker starts with its own empty cache. Callers must not write
    into the returned array (the example path crops, resizes and pads into new arrays).
    """

    def __init__(self):
        self._path, self._image = None, None

    def __call__(self, path: str) -> np.ndarray:
        if path != self._path:
            self._path, self._image = None, None
            self._image = decode_image(path)
            self._path = path
        return self._image

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def image_hw(path: str) -> tuple[int, int]:
    """(h, w) of an image file from its header; DataError naming the file if unreadable or of
    pixels ``decode_image`` refuses."""
    try:
        with Image.open(path) as im:
            (w, h), mode = im.size, im.mode
    except UNREADABLE_IMAGE_ERRORS as e:
        raise DataError(f"{path}: cannot read image: {e}") from e
    _refuse_rangeless(path, mode)
    return h, w


def resize_keep_aspect(image: np.ndarray, boxes: np.ndarray, size: int):
    """(resized image, boxes * scale, scale) with the longer side = ``size`` px.

    scale = size / max(h, w); the resized image is round(h*scale) x round(w*scale) px.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    return image, boxes * np.float32(scale), np.float32(scale)


def hflip(image: np.ndarray, boxes: np.ndarray):
    """Mirror image [h, w, 3] and boxes [M, 4] left-right: x -> w - x (box edges swap)."""
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image[:, ::-1], flipped


def pad_example(image, boxes, labels, ignore, size: int, max_boxes: int, *, name: str):
    """Image padded to [size, size, 3] and the box arrays to N = max_boxes rows.

    Raises DataError naming the image when it has more than ``max_boxes`` boxes: boxes are
    never dropped; the message says to raise ``data.max_boxes``.
    """
    count = len(boxes)
    if count > max_boxes:
        raise DataError(
            f"{name}: {count} boxes (incl. ignore regions) exceed data.max_boxes={max_boxes}; "
            "raise data.max_boxes (see dfrdet_jax.data.max_boxes_per_image)"
        )
    h, w = image.shape[:2]
    padded = np.zeros((size, size, 3), np.uint8)
    padded[:h, :w] = image
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_boxes[:count] = boxes
    out_labels = np.full((max_boxes,), -1, np.int32)
    out_labels[:count] = labels
    valid = np.zeros((max_boxes,), bool)
    valid[:count] = True
    out_ignore = np.zeros((max_boxes,), bool)
    out_ignore[:count] = ignore
    return {
        "image": padded,
        "boxes": out_boxes,
        "labels": out_labels,
        "box_valid": valid,
        "ignore": out_ignore,
        "image_hw": np.array([h, w], np.int32),
    }


def example_from_record(
    record: dict,
    size: int,
    max_boxes: int,
    flip: bool,
    decode: Callable[[str], np.ndarray] = decode_image,
) -> dict:
    """One standard example (unbatched) from a source record (see sources/coco.py); image files
    are read with ``decode`` (``decode_image``, or a ``LastImageDecoder`` for DOTA tiles)."""
    if record["path"] is None:  # pad image of a final partial eval batch
        image = np.zeros((size, size, 3), np.uint8)
        out = pad_example(image, np.zeros((0, 4), np.float32), [], [], size, max_boxes, name="pad")
        out.update(image_hw=np.zeros(2, np.int32), image_id=np.int64(-1), scale=np.float32(1))
    else:
        if "image" in record:  # tfds builds carry decoded pixels (DOTA: the tile's own)
            image = record["image"]
        else:  # raw sources a path (DOTA: of the full image)
            image = decode(record["path"])
            if tuple(image.shape[:2]) != tuple(record["hw"]) and "tile_offset" not in record:
                (h, w), (rh, rw) = image.shape[:2], record["hw"]
                raise DataError(
                    f"{record['path']}: decoded {w}x{h} px where its record says {rw}x{rh}: "
                    "the file changed after its annotations were read"
                )
            if "tile_offset" in record:  # DOTA tile: crop [x0, x0+tile) x [y0, y0+tile)
                x0, y0 = (int(v) for v in record["tile_offset"])
                image = image[y0 : y0 + record["tile_size"], x0 : x0 + record["tile_size"]]
        image, boxes, scale = resize_keep_aspect(image, record["boxes"], size)
        if flip:
            image, boxes = hflip(image, boxes)
        out = pad_example(
            image, boxes, record["labels"], record["ignore"], size, max_boxes, name=record["path"]
        )
        out.update(image_id=np.int64(record["image_id"]), scale=scale)
    if "tile_offset" in record:
        out["tile_offset"] = np.asarray(record["tile_offset"], np.float32)
    return out
