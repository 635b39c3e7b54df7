"""The tfds builder builds without TensorFlow and the pipeline reads its build."""

import sys

import numpy as np
import tensorflow_datasets as tfds

from dfrdet_jax import data
from dfrdet_jax.data.fixtures import write_coco_fixture
from dfrdet_jax.data.tfds import builders


def test_tinyperson_build_and_read_match_raw(tmp_path):
    images = [
        {"id": 5, "file_name": "a.png", "height": 64, "width": 48},
        {"id": 9, "file_name": "b.png", "height": 32, "width": 64},
    ]
    anns = [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 5, 6], "iscrowd": 0},
        {
            "id": 2,
            "image_id": 5,
            "category_id": 2,
            "bbox": [10, 10, 4, 4],
            "iscrowd": 0,
            "ignore": True,
        },
        {"id": 3, "image_id": 9, "category_id": 2, "bbox": [30, 3, 8, 2], "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "sea_person"}, {"id": 2, "name": "earth_person"}]
    manual = tmp_path / "tiny_set"
    for split in ("train", "test"):
        write_coco_fixture(
            str(manual),
            images,
            cats,
            anns,
            ann_name=f"annotations/tiny_set_{split}.json",
            image_dir=split,
        )
    builder = builders.TinyPersonBuilder(
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    assert "tensorflow" not in sys.modules
    config = data.default_data_config("tinyperson")
    config.root, config.image_size, config.max_boxes = str(manual), 64, 4
    kw = {"train": False, "batch_size": 2, "seed": 0}
    raw = next(iter(data.build_dataset(config, "test", **kw).loader))
    config.source, config.tfds_dir = "tfds", str(tmp_path / "tfds")
    ds = data.build_dataset(config, "test", **kw)
    assert ds.category_ids == [1, 2] and ds.class_names == ["sea_person", "earth_person"]
    built = next(iter(ds.loader))
    order = np.argsort(built["image_id"])  # tfds may store examples in another order
    for key in raw:
        np.testing.assert_array_equal(built[key][order], raw[key])
