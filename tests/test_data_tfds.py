"""The tfds builders build without TensorFlow, and the pipeline reads a build, without the
manual folder, into exactly the batches, report and ground truth of the raw pipeline."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dfrdet_jax import data
from dfrdet_jax.data.fixtures import write_coco_fixture, write_dota_fixture
from dfrdet_jax.data.tfds import builders

TINYPERSON = {
    "images": [
        {"id": 5, "file_name": "a.png", "height": 64, "width": 48},
        {"id": 9, "file_name": "b.png", "height": 32, "width": 64},
    ],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 5, 6], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 2, "bbox": [10, 10, 4, 4], "ignore": True},
        {"id": 3, "image_id": 9, "category_id": 2, "bbox": [30, 3, 8, 2], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "sea_person"}, {"id": 2, "name": "earth_person"}],
}
AITOD_NAMES = ("airplane", "bridge", "storage-tank", "ship", "swimming-pool", "vehicle")
AITOD_NAMES += ("person", "wind-mill")
AITOD = {
    "images": [
        {"id": 1, "file_name": "x.png", "height": 64, "width": 96},
        {"id": 2, "file_name": "y.png", "height": 80, "width": 80},
        {"id": 3, "file_name": "z.png", "height": 96, "width": 64},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 8, "bbox": [3, 4, 6, 5], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 6, "bbox": [20, 5, 0, 3], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [70, 60, 9.5, 19], "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 4, "bbox": [0, 0, 2, 2], "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 7, "bbox": [40, 80, 3, 3], "iscrowd": 0},
    ],
    "categories": [{"id": i, "name": n} for i, n in enumerate(AITOD_NAMES, 1)],
}
# DOTA: 160 x 120 px and 128 x 64 px, tiles of 64 px overlapping by 16: 9 + 3 tiles.
DOTA_LABELS = {
    "P1": (
        120,
        160,
        [
            "5 5 15 5 15 15 5 15 plane 0",  # in tile (0, 0) only
            "56 20 76 20 76 30 56 30 ship 0",  # 8 of 20 px in tile (0, 0): dropped there
            "100 40 112 40 112 52 100 52 small-vehicle 0",  # 4 of 12 px in (48|96, 48): dropped
            "40 70 70 70 70 80 40 80 large-vehicle 0",  # cut by x = 64 and x = 48: clipped, kept
            "130 100 140 100 140 110 130 110 bridge 1",  # difficult: ignore region
            "150 -4 170 -4 170 8 150 8 harbor 0",  # past the image border: clipped to it
        ],
    ),
    "P2": (64, 128, ["10 10 20 10 20 20 10 20 plane 0", "50 30 62 30 62 40 50 40 ship 1"]),
}
DOTA_COUNTS = {"box below min_visible in a tile": 3, "box outside image (clipped)": 1}


def _examples(ds) -> dict[str, np.ndarray]:
    """Every real (not padding) example of an eval pipeline, by (image_id, tile y, tile x)."""
    batches = list(ds.loader)
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    out = {key: value[out["image_id"] >= 0] for key, value in out.items()}
    offset = out.get("tile_offset", np.zeros((len(out["image_id"]), 2)))
    order = np.lexsort((offset[:, 0], offset[:, 1], out["image_id"]))
    return {key: value[order] for key, value in out.items()}


def _assert_build_reads_like_raw(tmp_path, config, split, builder, manual, batch_size):
    """Build, move the manual folder away, and compare the tfds pipeline with the raw one."""
    kw = {"train": False, "batch_size": batch_size, "seed": 0}
    raw = data.build_dataset(config, split, **kw)
    expected = _examples(raw)
    with open(raw.annotation_file) as f:
        expected_gt = json.load(f)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    os.rename(manual, tmp_path / "moved")  # the build alone must do from here on
    config.source, config.tfds_dir = "tfds", str(tmp_path / "tfds")
    ds = data.build_dataset(config, split, **kw)
    got = _examples(ds)
    assert sorted(got) == sorted(expected) and ds.num_images == raw.num_images
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert (ds.category_ids, ds.class_names) == (raw.category_ids, raw.class_names)
    # Evaluation and prediction take the class table from the build too.
    info = data.dataset_info(config)
    assert (info.num_classes, info.class_names, info.category_ids) == (
        raw.num_classes,
        raw.class_names,
        raw.category_ids,
    )
    assert dict(ds.report.counts) == dict(raw.report.counts)
    assert ds.annotation_file.startswith(config.tfds_dir)
    with open(ds.annotation_file) as f:
        assert json.load(f) == expected_gt
    assert "tensorflow" not in sys.modules  # neither building nor reading needs it
    return ds, got


@pytest.mark.parametrize(
    ("name", "split", "coco", "counts"),
    [
        ("tinyperson", "test", TINYPERSON, {}),
        ("aitod", "val", AITOD, {"degenerate box expanded to 1 px": 1}),
    ],
)
def test_coco_build_reads_like_raw(tmp_path, name, split, coco, counts):
    config = data.default_data_config(name)
    manual = tmp_path / name
    write_coco_fixture(
        str(manual),
        coco["images"],
        coco["categories"],
        coco["annotations"],
        ann_name=config.ann_pattern.format(split=split),
        image_dir=config.image_pattern.format(split=split),
    )
    # A palette PNG: the raw pipeline reads it through convert('RGB'), so must the build.
    first = manual / config.image_pattern.format(split=split) / coco["images"][0]["file_name"]
    with Image.open(first) as im:
        im.convert("P").save(first)
    config.root, config.image_size, config.max_boxes = str(manual), 64, 4
    builder = {"aitod": builders.AitodBuilder, "tinyperson": builders.TinyPersonBuilder}[name](
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    )
    ds, _ = _assert_build_reads_like_raw(tmp_path, config, split, builder, manual, batch_size=2)
    assert dict(ds.report.counts) == counts
    assert ds.category_ids == sorted(c["id"] for c in coco["categories"])


def test_dota_build_reads_like_raw_tiles(tmp_path):
    manual = tmp_path / "dota2"
    write_dota_fixture(str(manual), "val", DOTA_LABELS)
    config = data.default_data_config("dota2")
    config.root, config.cache_dir = str(manual), str(tmp_path / "cache")
    config.image_size, config.max_boxes = 64, 8
    config.tile_size, config.tile_overlap, config.min_visible = 64, 16, 0.5
    builder = builders.Dota2Builder(
        data_dir=str(tmp_path / "tfds"),
        config=builders.dota2_config(64, 16, 0.5),
        file_format="array_record",
    )
    # 12 tiles in batches of 5: the last batch is padded with 3 pad tiles.
    ds, tiles = _assert_build_reads_like_raw(tmp_path, config, "val", builder, manual, batch_size=5)
    assert dict(ds.report.counts) == DOTA_COUNTS
    assert ds.num_images == 12
    np.testing.assert_array_equal(tiles["image_id"], [1] * 9 + [2] * 3)
    np.testing.assert_array_equal(tiles["tile_offset"][:3], [[0, 0], [48, 0], [96, 0]])
    np.testing.assert_array_equal(tiles["tile_offset"][9:], [[0, 0], [48, 0], [64, 0]])
    # The large vehicle (40..70, 70..80) in tile (48, 48): clipped to its 22 visible px.
    rows = tiles["boxes"][4][tiles["box_valid"][4]]
    assert [0, 22, 22, 32] in rows.tolist()

    config.tile_size = 96
    differs = r"tile_size=64 \(config data.tile_size=96\) in .*dota2_config\(tile_size=96, "
    with pytest.raises(data.DataError, match=differs):
        data.build_dataset(config, "val", train=False, batch_size=4, seed=0)


def test_default_dota_tiling_is_the_registered_config():
    default = builders.dota2_config()
    assert default is builders.Dota2Builder.BUILDER_CONFIGS[0]
    assert (default.tile_size, default.overlap, default.min_visible) == (1024, 200, 0.5)
    custom = builders.dota2_config(64, 16, 0.5)
    assert custom.name == "tile64_overlap16_visible0.5" and custom.tile_size == 64
