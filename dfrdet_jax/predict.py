"""Detections on the user's own images, of any size: the ``predict`` mode and its Python API.

  predictor = Predictor.from_workdir(config, workdir)   # or Predictor.from_export(export_dir)
  results = predictor(image)          # uint8 [h, w, 3]: COCO results in the image's pixels

A deployment needs only the export folder (``--mode export``: packed weights and the run's
config): ``python -m dfrdet_jax.predict --export DIR --input IMAGES [--out DIR]``.

``config.predict.mode`` 'tiles' (default) slices the image at the model's resolution and merges
the tiles (dfrdet_jax/sliced.py); 'whole' resizes it to ``data.image_size``, the one-tile case,
with a warning when that shrinks it more than ``predict.max_downscale`` times (tiny objects
vanish). ``predict_folder`` is the CLI's ``--mode predict``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from dfrdet_jax import data as data_lib
from dfrdet_jax import evaluate, export, run_utils, sharding, sliced, viz
from dfrdet_jax.data import transforms
from dfrdet_jax.models import registry


@flax.struct.dataclass
class Weights:
    """Inference weights where ``steps.make_predict_step`` reads them from a train state."""

    params: Any
    batch_stats: Any


class Predictor:
    """A restored detector and its jit-compiled inference, called on whole images."""

    def __init__(self, config: ml_collections.ConfigDict, model, state, mesh, info):
        p = config.predict
        if p.mode not in ("tiles", "whole"):
            raise ValueError(f"config.predict.mode must be 'tiles' or 'whole', got {p.mode!r}")
        if not 0 <= p.tile_overlap < 1:
            raise ValueError(
                f"config.predict.tile_overlap is a fraction of the tile in [0, 1), got "
                f"{p.tile_overlap}"
            )
        self.config, self.info = config, info
        self.image_size = config.data.image_size
        self.tile = p.tile_size if p.tile_size > 0 else self.image_size
        self.merge_iou = p.merge_iou if p.merge_iou > 0 else config.postprocess.nms_iou_threshold
        predict = evaluate.predict_fn(config, model, mesh)
        self._detect = lambda batch: predict(state, batch)[0]

    @classmethod
    def from_workdir(cls, config: ml_collections.ConfigDict, workdir: str) -> Predictor:
        """The ``config.eval.checkpoint`` checkpoint (latest or best) of ``workdir``."""
        evaluate.check_eval_batch(config)
        return cls(config, *evaluate.restored_state(config, workdir))

    @classmethod
    def from_export(cls, directory: str, **predict_options) -> Predictor:
        """The exported detector of ``directory`` (``--mode export``); ``predict_options``
        override fields of its ``config.predict``."""
        config = export.load_export_config(directory)
        config.predict.update(predict_options)
        evaluate.check_eval_batch(config)
        variables, manifest = export.load_export(directory)
        info = data_lib.DatasetInfo(
            manifest["num_classes"], manifest["class_names"], manifest["category_ids"]
        )
        model = registry.build_model(config, num_classes=info.num_classes)
        mesh = sharding.make_mesh()
        weights = Weights(variables["params"], variables.get("batch_stats", {}))
        weights = jax.device_put(weights, sharding.replicated_sharding(mesh))
        return cls(config, model, weights, mesh, info)

    def tiling(self, height: int, width: int) -> tuple[int, int]:
        """(tile side, overlap) in image pixels for an image of this size."""
        if self.config.predict.mode == "whole":
            return max(height, width), 0
        return self.tile, int(round(self.tile * self.config.predict.tile_overlap))

    def detect(self, image: np.ndarray, progress=None) -> sliced.ImageDetections:
        """Detections of ``image`` (uint8 [h, w, 3]) in its pixels; ``progress``: a
        ``run_utils.Progress`` counting tiles."""
        h, w = image.shape[:2]
        tile, overlap = self.tiling(h, w)
        shrink = tile / self.image_size
        if shrink > self.config.predict.max_downscale:
            what = "the image" if self.config.predict.mode == "whole" else "tiles"
            logging.warning(
                "Resizing %s of %d px to %d px shrinks them %.1f times (more than "
                "config.predict.max_downscale=%g): objects of a few pixels vanish. "
                "config.predict.mode='tiles' with tile_size 0 keeps the model's scale.",
                what, tile, self.image_size, shrink, self.config.predict.max_downscale,
            )  # fmt: skip
        return sliced.detect_image(
            self._detect,
            image,
            tile=tile,
            overlap=overlap,
            image_size=self.image_size,
            batch_size=self.config.eval.batch_size,
            merge_iou=self.merge_iou,
            on_tiles=(lambda count: progress.update(count=count)) if progress else lambda c: None,
        )

    def __call__(self, image: np.ndarray, image_id: int = 0) -> list[dict]:
        """COCO results (the data set's category ids) of ``image`` (uint8 [h, w, 3])."""
        return self.detect(image).to_coco(image_id, self.info.category_ids)


def _draw(predictor: Predictor, image: np.ndarray, results: list[dict], out_path: str) -> None:
    """The image with its detections, scaled down to predict.max_drawn_side when larger."""
    side = predictor.config.predict.max_drawn_side
    factor = min(1.0, side / max(image.shape[:2]))
    if factor < 1.0:
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        results = [{**r, "bbox": [v * factor for v in r["bbox"]]} for r in results]
    viz.draw_detections(
        image, results, predictor.info.class_names, out_path, predictor.info.category_ids
    )


def predict_images(predictor: Predictor, input_path: str, out_dir: str) -> str:
    """Detections for the images of ``input_path`` (a folder or one image) into ``out_dir``:
    ``results.json`` (COCO results in each image's pixels; ``image_id`` is the position of the
    image in the sorted file list, and ``images.json`` maps ids to file names), a copy of every
    image with its boxes drawn and ``skipped_files.json``, the folder's files that are not
    images (a warning names them). Returns ``out_dir``."""
    files, skipped = data_lib.list_images(input_path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump(files, f, indent=1)
    with open(os.path.join(out_dir, "skipped_files.json"), "w") as f:
        json.dump(skipped, f, indent=1)
    if skipped:
        shown = ", ".join(os.path.basename(p) for p in skipped[:5])
        logging.warning(
            "Skipped %d files of %s that are not images (%s%s); listed in %s",
            len(skipped),
            input_path,
            shown,
            f" and {len(skipped) - 5} more" if len(skipped) > 5 else "",
            os.path.join(out_dir, "skipped_files.json"),
        )
    results = []
    for image_id, path in enumerate(files):
        image = transforms.decode_image(path)
        tile, overlap = predictor.tiling(*image.shape[:2])
        count = len(sliced.tile_origins(*image.shape[:2], tile, overlap))
        progress = run_utils.Progress(count, unit="tile")
        found = predictor.detect(image, progress).to_coco(image_id, predictor.info.category_ids)
        progress.close()
        _draw(predictor, image, found, os.path.join(out_dir, os.path.basename(path)))
        logging.info("%s: %d detections from %d tiles", path, len(found), count)
        results.extend(found)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    logging.info("Wrote %d detections for %d images to %s", len(results), len(files), out_dir)
    return out_dir


def predict_folder(config: ml_collections.ConfigDict, workdir: str, input_path: str) -> str:
    """The ``predict`` mode: ``predict_images`` of the workdir's checkpoint into
    ``workdir/predictions``; returns that folder."""
    predictor = Predictor.from_workdir(config, workdir)
    return predict_images(predictor, input_path, os.path.join(workdir, "predictions"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dfrdet_jax.predict",
        description="Detections of an exported detector on images of any size.",
    )
    parser.add_argument("--export", required=True, help="an export folder (--mode export)")
    parser.add_argument("--input", required=True, help="a folder of images, or one image")
    parser.add_argument("--out", help="output folder (default: EXPORT/../predictions)")
    parser.add_argument("--mode", choices=("tiles", "whole"), help="config.predict.mode")
    parser.add_argument("--tile_size", type=int, help="config.predict.tile_size (px)")
    parser.add_argument("--tile_overlap", type=float, help="config.predict.tile_overlap")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    options = {
        k: v
        for k, v in (("mode", args.mode), ("tile_size", args.tile_size),
                     ("tile_overlap", args.tile_overlap))
        if v is not None
    }  # fmt: skip
    predictor = Predictor.from_export(args.export, **options)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.export)), "predictions")
    print(predict_images(predictor, args.input, out_dir))


if __name__ == "__main__":
    main()
