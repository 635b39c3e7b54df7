"""DOTA-v2.0 parsing, tiling with overlap, and DOTA batches with tile offsets."""

import itertools
import json
import pickle

import numpy as np

from dfrdet_jax import data
from dfrdet_jax.data import transforms
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


def _counting_decoder(monkeypatch) -> list[str]:
    """Patch ``transforms.decode_image`` to record every file it decodes; returns the record."""
    decoded, decode = [], transforms.decode_image

    def counting(path):
        decoded.append(path)
        return decode(path)

    monkeypatch.setattr(transforms, "decode_image", counting)
    return decoded


def test_evaluation_decodes_each_full_image_once_for_its_tiles(tmp_path, monkeypatch):
    lines = ["5 5 15 5 15 15 5 15 plane 0", "60 40 80 40 80 50 60 50 ship 0"]
    write_dota_fixture(str(tmp_path), "val", {"P1": (120, 100, lines), "P2": (90, 130, lines)})
    config = data.default_data_config("dota2")
    config.root, config.cache_dir = str(tmp_path), str(tmp_path / "cache")
    config.image_size, config.tile_size, config.tile_overlap, config.max_boxes = 64, 64, 8, 4
    decoded = _counting_decoder(monkeypatch)

    def evaluation_batches():
        decoded.clear()
        ds = data.build_dataset(config, "val", train=False, batch_size=3, seed=0)
        return ds.num_images, list(ds.loader)

    num_tiles, cached = evaluation_batches()
    assert num_tiles == 10 and len(decoded) == len(set(decoded)) == 2  # 2 images, 4 + 6 tiles
    # Against decoding the full image anew for every tile: the same batches.
    monkeypatch.setattr(transforms, "LastImageDecoder", lambda: transforms.decode_image)
    _, uncached = evaluation_batches()
    assert len(decoded) == num_tiles and len(cached) == len(uncached)
    for a, b in zip(cached, uncached, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_last_image_decoder_pickles_empty(tmp_path, monkeypatch):
    write_dota_fixture(str(tmp_path), "val", {"P1": (40, 30, []), "P2": (20, 10, [])})
    decoded = _counting_decoder(monkeypatch)
    decoder = transforms.LastImageDecoder()
    first, second = (str(tmp_path / "val" / "images" / f"{n}.png") for n in ("P1", "P2"))
    assert decoder(first).shape == (40, 30, 3) and decoder(first) is decoder(first)
    assert decoder(second).shape == (20, 10, 3) and decoded == [first, second]
    restored = pickle.loads(pickle.dumps(decoder))  # what a grain worker receives
    assert restored(second).shape == (20, 10, 3) and decoded == [first, second, second]
