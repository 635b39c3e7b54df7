"""DOTA-v2.0 parsing, tiling with overlap, and DOTA batches with tile offsets."""

import itertools
import json

import numpy as np

from dfrdet_jax import data
from dfrdet_jax.data.errors import SkipReport
from dfrdet_jax.data.fixtures import write_dota_fixture
from dfrdet_jax.data.sources import dota


def test_parse_polygons_to_horizontal_boxes(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(
        "imagesource:GoogleEarth\ngsd:0.146\n"
        "10 5 20 8 18 30 7 25 small-vehicle 0\n1 1 4 1 4 3 1 3 helipad 1\n"
    )
    boxes, labels, difficult = dota.parse_label_file(str(path), SkipReport(False))
    np.testing.assert_array_equal(boxes, [[7, 5, 20, 30], [1, 1, 4, 3]])
    np.testing.assert_array_equal(labels, [10, 17])
    np.testing.assert_array_equal(difficult, [False, True])


def test_tile_starts_cover_with_overlap():
    assert dota.tile_starts(100, 128, 20) == [0]
    assert dota.tile_starts(300, 128, 28) == [0, 100, 172]
    for length in (129, 250, 1000):
        starts = dota.tile_starts(length, 64, 16)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + 64] = True
        assert covered.all() and starts[-1] + 64 == length
        assert all(b - a <= 48 for a, b in itertools.pairwise(starts))


def test_tiling_covers_image_and_boxes(tmp_path):
    lines = [
        "5 5 15 5 15 15 5 15 plane 0",  # inside the first tile only
        "60 40 80 40 80 50 60 50 ship 0",  # straddles the x border of tile 0
        "100 100 110 100 110 110 100 110 bridge 1",
    ]
    write_dota_fixture(str(tmp_path), "val", {"P7": (120, 120, lines)})
    gt = tmp_path / "gt.json"
    records, _images, _anns, report = dota.dota_records(
        str(tmp_path), "val", tile_size=64, overlap=8, min_visible=0.5, gt_json=str(gt)
    )
    offsets = sorted(r["tile_offset"] for r in records)
    assert offsets == [(0, 0), (0, 56), (56, 0), (56, 56)]
    # Every box is fully inside some tile when shifted back by its offset.
    for x1, y1, x2, y2 in [(5, 5, 15, 15), (60, 40, 80, 50), (100, 100, 110, 110)]:
        assert any(
            np.isclose(r["boxes"] + np.tile(r["tile_offset"], 2), [x1, y1, x2, y2])
            .all(axis=1)
            .any()
            for r in records
        )
    tile0 = next(r for r in records if r["tile_offset"] == (0, 0))
    # The ship is 4 of 20 px inside tile 0 (20% < 50%): dropped there and counted.
    np.testing.assert_array_equal(tile0["boxes"], [[5, 5, 15, 15]])
    assert report.counts["box below min_visible in a tile"] >= 1
    full = json.loads(gt.read_text())
    assert len(full["annotations"]) == 3 and full["images"][0]["width"] == 120
    assert [a["ignore"] for a in full["annotations"]] == [0, 0, 1]


def test_dota_batches_carry_tile_offsets(tmp_path):
    write_dota_fixture(str(tmp_path), "train", {"P1": (100, 90, ["1 1 9 1 9 9 1 9 plane 0"])})
    config = data.default_data_config("dota2")
    config.root, config.cache_dir = str(tmp_path), str(tmp_path / "cache")
    config.image_size, config.tile_size, config.tile_overlap, config.max_boxes = 64, 64, 16, 4
    ds = data.build_dataset(config, "train", train=False, batch_size=4, seed=0)
    assert ds.num_classes == 18 and ds.annotation_file.endswith("train_full_gt.json")
    batch = next(iter(ds.loader))
    np.testing.assert_array_equal(batch["tile_offset"], [[0, 0], [26, 0], [0, 36], [26, 36]])
    np.testing.assert_array_equal(batch["image_id"], [1, 1, 1, 1])
    np.testing.assert_allclose(batch["boxes"][0, 0], [1, 1, 9, 9])
