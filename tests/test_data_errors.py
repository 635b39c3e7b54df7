"""Every kind of bad input gives an error naming the file and the record (or is counted)."""

import json

import numpy as np
import pytest
from PIL import Image

from dfrdet_jax import data
from dfrdet_jax.data import loader, transforms
from dfrdet_jax.data.fixtures import write_coco_fixture, write_dota_fixture
from dfrdet_jax.data.sources import coco, dota

CATS = [{"id": 1, "name": "car"}, {"id": 2, "name": "ship"}]
IMAGES = [
    {"id": 1, "file_name": "a.png", "height": 64, "width": 64},
    {"id": 2, "file_name": "b.png", "height": 64, "width": 64},
]


def _ann(ann_id, **kw):
    return dict(
        {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0}, **kw
    )


def test_missing_image_file(tmp_path):
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES, CATS, [_ann(1)])
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(data.DataError, match=r"ann\.json: image id 2: file .*b\.png"):
        coco.coco_records(ann_file, image_dir)
    records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    assert [r["image_id"] for r in records] == [1]
    assert report.counts == {"missing image file": 1}


def test_unreadable_image(tmp_path):
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES[:1], CATS, [_ann(1)])
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    records, *_ = coco.coco_records(ann_file, image_dir)
    config = data.default_data_config("aitod")
    config.max_boxes, config.image_size = 4, 64
    batches = loader.make_loader(records, config, train=False, batch_size=1, seed=0)
    with pytest.raises(data.DataError, match=r"a\.png: cannot read image"):
        next(iter(batches))


def test_image_over_the_pixel_limit_names_the_file(tmp_path, monkeypatch):
    # DOTA-v2.0's largest images (0.8 Gpx) are allowed; a file past the limit is a clear error.
    assert Image.MAX_IMAGE_PIXELS >= transforms.MAX_IMAGE_PIXELS
    write_coco_fixture(str(tmp_path), IMAGES[:1], CATS, [_ann(1)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL errors above twice the limit
    path = str(tmp_path / "images" / "a.png")
    for read in (transforms.image_hw, transforms.decode_image):
        with pytest.raises(data.DataError, match=r"a\.png: cannot read image"):
            read(path)


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '{"images": []}',
        '{"images": [], "annotations"',
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}'),
    ],
)
def test_json_not_coco_shaped(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(data.DataError, match=r"bad\.json"):
        coco.coco_records(str(path), str(tmp_path))


def test_unknown_category(tmp_path):
    ann_file, image_dir = write_coco_fixture(
        str(tmp_path), IMAGES, CATS, [_ann(1), _ann(7, category_id=9)]
    )
    with pytest.raises(data.DataError, match=r"ann\.json: annotation id 7 .*category_id 9"):
        coco.coco_records(ann_file, image_dir)
    records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    assert len(records[0]["boxes"]) == 1 and report.counts == {"unknown category": 1}


def test_box_outside_image(tmp_path):
    ann_file, image_dir = write_coco_fixture(
        str(tmp_path), IMAGES, CATS, [_ann(4, bbox=[60, 10, 10, 5])]
    )
    with pytest.raises(data.DataError, match=r"ann\.json: annotation id 4 .*outside"):
        coco.coco_records(ann_file, image_dir)
    records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    np.testing.assert_allclose(records[0]["boxes"], [[60, 10, 64, 15]])
    assert report.counts == {"box outside image (clipped)": 1}


def test_dota_wrong_field_count(tmp_path):
    write_dota_fixture(
        str(tmp_path),
        "train",
        {
            "P1": (
                64,
                64,
                ["imagesource:GoogleEarth", "gsd:0.5", "1 1 9 1 9 9 1 9 plane 0", "1 2 3 ship"],
            )
        },
    )
    with pytest.raises(data.DataError, match=r"P1\.txt:4: .*got 4 fields"):
        dota.dota_records(str(tmp_path), "train")
    records, *_, report = dota.dota_records(str(tmp_path), "train", lenient=True)
    assert len(records[0]["boxes"]) == 1
    assert report.counts == {"DOTA line with wrong field count": 1}


def test_report_is_json_able_counts(tmp_path):
    ann_file, image_dir = write_coco_fixture(
        str(tmp_path), IMAGES, CATS, [_ann(1, category_id=5), _ann(2, bbox=[0, 0, 0, 2])]
    )
    *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    assert json.loads(json.dumps(report.counts)) == {
        "unknown category": 1,
        "degenerate box expanded to 1 px": 1,
    }
