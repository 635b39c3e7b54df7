"""tfds builders for AI-TOD and TinyPerson that build without TensorFlow.

They read the user's manual download (``manual_dir``, laid out as the raw sources expect:
``config.ann_pattern`` / ``config.image_pattern`` under it) through the same validating
loader as the raw pipeline (sources/coco.py) and write ``array_record`` files, read back with
``builder.as_data_source()`` (no TensorFlow needed for either step). Images are stored as the
original encoded files (passing a path to tfds.features.Image copies the bytes; handing it a
numpy array would need TensorFlow to encode).

Per example: image uint8 [h, w, 3], image_id int64, file_name str, objects {bbox float32 [4]
(x1, y1, x2, y2) original pixels, label int64 class index, ignore bool}. The class table
(category_ids, class_names) is kept in the build's metadata.

DOTA-v2.0 has no builder: its tiling needs every image's size up front, which the raw source
reads from the image headers (see sources/dota.py).

Build:  builder = AitodBuilder(data_dir=..., file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=<aitod folder>))
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dfrdet_jax.data.config import default_data_config
from dfrdet_jax.data.sources import coco


class _CocoDetectionBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared builder of the COCO-format data sets; subclasses set ``DATA_NAME`` and splits."""

    VERSION = tfds.core.Version("1.0.0")
    DATA_NAME = ""
    SPLITS: tuple[str, ...] = ()
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the data set as laid out in its default_data_config."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's own lookup of this file needs the optional importlib_resources package.
        return epath.Path(__file__)

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
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config = default_data_config(self.DATA_NAME)
        generators = {}
        for split in self.SPLITS:
            ann_file = os.path.join(dl_manager.manual_dir, config.ann_pattern.format(split=split))
            if os.path.isfile(ann_file):
                image_dir = os.path.join(
                    dl_manager.manual_dir, config.image_pattern.format(split=split)
                )
                generators[split] = self._generate_examples(ann_file, image_dir)
        if not generators:
            raise FileNotFoundError(f"{dl_manager.manual_dir}: no {config.ann_pattern} file")
        return generators

    def _generate_examples(self, ann_file, image_dir):
        records, category_ids, names, _ = coco.coco_records(ann_file, image_dir)
        self.info.metadata["category_ids"] = category_ids
        self.info.metadata["class_names"] = names
        for r in records:
            yield (
                r["image_id"],
                {
                    "image": r["path"],
                    "image_id": r["image_id"],
                    "file_name": os.path.relpath(r["path"], image_dir),
                    "objects": {
                        "bbox": r["boxes"],
                        "label": r["labels"].astype(np.int64),
                        "ignore": r["ignore"],
                    },
                },
            )


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
