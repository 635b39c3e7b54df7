"""tfds builders for AI-TOD, TinyPerson and DOTA-v2.0 that build without TensorFlow.

They read the user's manual download (``manual_dir``, laid out as the raw sources expect:
``config.ann_pattern`` / ``config.image_pattern`` under it for AI-TOD and TinyPerson,
``<split>/{images,labelTxt}`` for DOTA) through the same validating loaders as the raw pipeline
(sources/coco.py, sources/dota.py; strict, degenerate boxes expanded to 1 px) and write
``array_record`` files, read back with ``builder.as_data_source()`` (reader.py; no TensorFlow
needed for either step). tfds.features.Image is only ever handed encoded bytes or a file path
(it copies the bytes); a numpy array would need TensorFlow to encode.

Per example: image uint8 [h, w, 3], image_id int64, file_name str (relative to the split's
image folder), objects {bbox float32 [4] (x1, y1, x2, y2) pixels of the stored image, label
int64 class index, ignore bool (TinyPerson ignore/uncertain, DOTA difficult)}; DOTA adds
tile_offset int64 [2] (x, y) of the tile in the full image, whose image_id it carries.

  AI-TOD, TinyPerson: one example per image, the original file's bytes (RGB and grayscale
    files; other modes, e.g. palette PNGs, are stored as RGB PNGs so the pixels read back are
    those of the raw pipeline's ``convert('RGB')``).
  DOTA-v2.0: one example per tile of sources/dota.dota_records: the tile's pixels cropped from
    the full image (decoded once per image) and stored as an RGB PNG. The tiling (tile_size,
    overlap, min_visible) is the builder config (``dota2_config``; default 1024 / 200 / 0.5):
    each tiling is its own build under ``<data_dir>/dota2/<config name>/<version>``. A split
    is built when its labelTxt folder exists (DOTA-v2.0's test-dev has none).

Everything the pipeline and evaluation need travels with the build, so the manual folder is not
needed once built. Next to the array_record files (``builder.data_dir``), written while building
into tfds's temporary folder, so they appear with the build and reading writes nothing:
  metadata.json     category_ids, class_names, reports {split: {counts, examples}} (the
                    loader's skip/repair report at build time), DOTA also tiling
  <split>_gt.json   ground truth in COCO format for DetectionDataset.annotation_file: a copy of
                    the split's json (AI-TOD, TinyPerson) or the full-image ground truth that
                    dota_records writes (DOTA); see ``gt_path``

Build:  builder = AitodBuilder(data_dir=..., file_format="array_record")
        (DOTA: Dota2Builder(data_dir=..., config=dota2_config(tile_size, overlap, min_visible),
         file_format="array_record"))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=<data set folder>))
"""

import dataclasses
import io
import os
import shutil
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dfrdet_jax.data import transforms
from dfrdet_jax.data.catalog import default_data_config
from dfrdet_jax.data.errors import DataError
from dfrdet_jax.data.sources import coco, dota

# Image modes whose file bytes tfds decodes to the pixels the raw pipeline's convert('RGB') gives.
_STORED_AS_IS = ("RGB", "L")


def gt_path(data_dir: str, split: str) -> str:
    """The COCO ground-truth json of ``split`` inside a build's ``data_dir``."""
    return os.path.join(data_dir, f"{split}_gt.json")


def _png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of uint8 [h, w, 3] pixels."""
    buffer = io.BytesIO()
    # Fast compression: DOTA tiles are large and many; PNG stays lossless at every level.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _example(record: dict, image, file_name: str) -> dict:
    """The features common to every builder from a source record and the encoded image."""
    return {
        "image": image,
        "image_id": record["image_id"],
        "file_name": file_name,
        "objects": {
            "bbox": record["boxes"],
            "label": record["labels"].astype(np.int64),
            "ignore": record["ignore"],
        },
    }


class _DetectionBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared features, split discovery and metadata; subclasses generate the examples."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Images and boxes.",
        "1.1.0": "The build carries each split's ground-truth json and the loader's report.",
    }
    SPLITS: tuple[str, ...] = ()
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the data set as laid out in its default_data_config."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's own lookup of this file needs the optional importlib_resources package.
        return epath.Path(__file__)

    @classmethod
    def from_data_config(cls, config, **kwargs) -> "_DetectionBuilder":
        """The builder of the build that data config ``config`` reads; kwargs go to __init__."""
        del config  # one build per data set
        return cls(**kwargs)

    def not_built_error(self, tfds_dir: str) -> DataError:
        """The error for reading this build from ``tfds_dir`` before it is built."""
        del tfds_dir
        return DataError(
            f"{self.data_dir}: not built; build it first (see dfrdet_jax.data.tfds.builders)"
        )

    def _extra_features(self) -> dict:
        """Features beyond the common ones (DOTA: tile_offset)."""
        return {}

    def _split_marker(self, split: str) -> str:
        """The path under the manual folder whose presence means ``split`` is there."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "image_id": np.int64,
                    "file_name": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                            "label": np.int64,
                            "ignore": np.bool_,
                        }
                    ),
                    **self._extra_features(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        generators = {
            split: self._generate_examples(manual, split)
            for split in self.SPLITS
            if os.path.exists(os.path.join(manual, self._split_marker(split)))
        }
        if not generators:
            markers = ", ".join(self._split_marker(s) for s in self.SPLITS)
            raise FileNotFoundError(f"{manual}: none of {markers}")
        return generators

    def _keep_in_metadata(self, split: str, category_ids, class_names, report) -> None:
        """Store the class table and the split's report (read back by reader.py)."""
        meta = self.info.metadata
        meta["category_ids"] = [int(c) for c in category_ids]
        meta["class_names"] = list(class_names)
        meta.setdefault("reports", {})[split] = {
            "counts": dict(report.counts),
            "examples": dict(report.examples),
        }


class _CocoDetectionBuilder(_DetectionBuilder):
    """COCO-format data sets; subclasses set ``name``, ``DATA_NAME`` and ``SPLITS``."""

    DATA_NAME = ""

    def _split_marker(self, split: str) -> str:
        return default_data_config(self.DATA_NAME).ann_pattern.format(split=split)

    def _generate_examples(self, manual: str, split: str):
        config = default_data_config(self.DATA_NAME)
        ann_file = os.path.join(manual, config.ann_pattern.format(split=split))
        image_dir = os.path.join(manual, config.image_pattern.format(split=split))
        records, category_ids, names, report = coco.coco_records(ann_file, image_dir)
        shutil.copyfile(ann_file, gt_path(self.data_dir, split))
        self._keep_in_metadata(split, category_ids, names, report)
        for r in records:
            with Image.open(r["path"]) as im:
                as_is = im.mode in _STORED_AS_IS
            image = r["path"] if as_is else _png(transforms.decode_image(r["path"]))
            yield r["image_id"], _example(r, image, os.path.relpath(r["path"], image_dir))


class AitodBuilder(_CocoDetectionBuilder):
    """AI-TOD v1 (8 classes, 800x800)."""

    name = "aitod"
    DATA_NAME = "aitod"
    SPLITS = ("train", "val", "trainval", "test")


class TinyPersonBuilder(_CocoDetectionBuilder):
    """TinyPerson (ignore/uncertain annotations become ignore regions)."""

    name = "tinyperson"
    DATA_NAME = "tinyperson"
    SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class Dota2Config(tfds.core.BuilderConfig):
    """A DOTA tiling (sources/dota.py): square tiles of ``tile_size`` px overlapping by
    ``overlap`` px; a cut box is kept in a tile when at least ``min_visible`` of it shows."""

    tile_size: int = 1024
    overlap: int = 200
    min_visible: float = 0.5


def _tiling_name(tile_size: int, overlap: int, min_visible: float) -> str:
    return f"tile{tile_size}_overlap{overlap}_visible{min_visible!r}"


# DOTA tiling: Dota2Config field -> data config field.
_TILING_FIELDS = {"tile_size": "tile_size", "overlap": "tile_overlap", "min_visible": "min_visible"}


class Dota2Builder(_DetectionBuilder):
    """DOTA-v2.0 tiles (18 classes; difficult objects become ignore regions)."""

    name = "dota2"
    SPLITS = ("train", "val", "test")  # a split is built when its labelTxt folder exists
    BUILDER_CONFIGS: ClassVar[list[Dota2Config]] = [Dota2Config(name=_tiling_name(1024, 200, 0.5))]

    @classmethod
    def from_data_config(cls, config, **kwargs) -> "Dota2Builder":
        """The builder of the config's tiling (data.tile_size, tile_overlap, min_visible)."""
        tiling = {key: config[field] for key, field in _TILING_FIELDS.items()}
        return cls(config=dota2_config(**tiling), **kwargs)

    def not_built_error(self, tfds_dir: str) -> DataError:
        """Names how each dota2 build in ``tfds_dir`` differs from this tiling, if any is."""
        c = self.builder_config
        tiling = {"tile_size": c.tile_size, "overlap": c.overlap, "min_visible": c.min_visible}
        differences = []
        for meta_file in sorted(epath.Path(tfds_dir, self.name).glob("*/*/metadata.json")):
            meta = tfds.core.MetadataDict()
            meta.load_metadata(meta_file.parent)
            built = meta.get("tiling")
            if built is None:
                continue
            differences.append(
                ", ".join(
                    f"{key}={built[key]} (config data.{field}={tiling[key]})"
                    for key, field in _TILING_FIELDS.items()
                    if built[key] != tiling[key]
                )
                + f" in {meta_file.parent}"
            )
        if not differences:
            return super().not_built_error(tfds_dir)
        asked = ", ".join(f"{key}={value!r}" for key, value in tiling.items())
        return DataError(
            f"{tfds_dir}: no dota2 build with the config's tiling; the builds there differ: "
            + "; ".join(differences)
            + ". Set data.tile_size/tile_overlap/min_visible to a built tiling, or build this "
            f"one: Dota2Builder(data_dir={tfds_dir!r}, config=dota2_config({asked}), "
            "file_format='array_record').download_and_prepare(download_config="
            "tfds.download.DownloadConfig(manual_dir=<DOTA folder>))"
        )

    def _extra_features(self) -> dict:
        return {"tile_offset": tfds.features.Tensor(shape=(2,), dtype=np.int64)}

    def _split_marker(self, split: str) -> str:
        return os.path.join(split, "labelTxt")

    def _generate_examples(self, manual: str, split: str):
        c = self.builder_config
        records, _, _, report = dota.dota_records(
            manual,
            split,
            tile_size=c.tile_size,
            overlap=c.overlap,
            min_visible=c.min_visible,
            gt_json=gt_path(self.data_dir, split),
        )
        num_classes = len(dota.CLASS_NAMES)
        self._keep_in_metadata(split, range(1, num_classes + 1), dota.CLASS_NAMES, report)
        self.info.metadata["tiling"] = {
            "tile_size": c.tile_size,
            "overlap": c.overlap,
            "min_visible": c.min_visible,
        }
        image_dir = os.path.join(manual, split, "images")
        path = pixels = None
        for r in records:  # the tiles of an image are consecutive: decode each image once
            if r["path"] != path:
                path, pixels = r["path"], transforms.decode_image(r["path"])
            x0, y0 = r["tile_offset"]
            tile = pixels[y0 : y0 + c.tile_size, x0 : x0 + c.tile_size]
            example = _example(r, _png(tile), os.path.relpath(path, image_dir))
            example["tile_offset"] = np.array([x0, y0], np.int64)
            yield f"{r['image_id']}:{x0}:{y0}", example


def dota2_config(tile_size: int = 1024, overlap: int = 200, min_visible: float = 0.5):
    """The Dota2Builder config of a tiling (the registered default, or a new one named by it)."""
    tile_size, overlap, min_visible = int(tile_size), int(overlap), float(min_visible)
    name = _tiling_name(tile_size, overlap, min_visible)
    # tfds refuses a new config object that shares a registered config's name.
    return Dota2Builder.get_builder_config(name) or Dota2Config(
        name=name, tile_size=tile_size, overlap=overlap, min_visible=min_visible
    )
