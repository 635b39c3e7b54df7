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


def test_unreadable_image_is_found_before_training(tmp_path):
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES, CATS, [_ann(1), _ann(2)])
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=r"ann\.json: image id 1: .*a\.png: cannot read"):
        coco.coco_records(ann_file, image_dir)
    records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    assert [r["image_id"] for r in records] == [2]
    # Its two annotations are counted, not dropped silently.
    assert report.counts == {"unreadable image file": 1, "annotation of a skipped image": 2}


def _truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])  # a valid header, half the pixels


def test_truncated_image_found_by_verify_images_else_named_by_its_batch(tmp_path):
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES, CATS, [_ann(1)])
    _truncate(tmp_path / "images" / "a.png")
    # The header check passes; decoding fails when the batch comes, naming the file and the fix.
    records, *_ = coco.coco_records(ann_file, image_dir)
    config = data.default_data_config("aitod")
    config.max_boxes, config.image_size = 4, 64
    batches = loader.make_loader(records, config, train=False, batch_size=1, seed=0)
    with pytest.raises(data.DataError, match=r"a\.png: cannot read image.*verify_images=True"):
        next(iter(batches))
    with pytest.raises(data.DataError, match=r"image id 1: .*a\.png: cannot read"):
        coco.coco_records(ann_file, image_dir, decode_images=True)
    records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True, decode_images=True)
    assert [r["image_id"] for r in records] == [2]
    assert report.counts == {"unreadable image file": 1, "annotation of a skipped image": 1}


def test_verify_images_reaches_the_records_from_the_config(tmp_path):
    write_coco_fixture(
        str(tmp_path), IMAGES, CATS, [_ann(1)], "annotations/aitod_val_v1.json", "images/val"
    )
    _truncate(tmp_path / "images" / "val" / "a.png")
    config = data.default_data_config("aitod")
    config.root, config.verify_images = str(tmp_path), True
    with pytest.raises(data.DataError, match=r"a\.png: cannot read"):
        data.load_records(config, "val")


def test_duplicate_image_ids_name_both_files(tmp_path):
    images = [IMAGES[0], dict(IMAGES[1], id=1)]
    ann_file, image_dir = write_coco_fixture(str(tmp_path), images, CATS, [_ann(1)])
    for lenient in (False, True):  # which image the boxes belong to is unknowable: never guessed
        with pytest.raises(data.DataError, match=r"image id 1 is used twice \('a\.png' and 'b"):
            coco.coco_records(ann_file, image_dir, lenient=lenient)


def test_image_size_differs_from_the_json(tmp_path):
    # The file is 64 x 64; the json says 128 wide (boxes would land off the image) or 32 wide
    # (a box would be blamed for leaving it): either way the image is named, with both sizes.
    for width in (128, 32):
        images = [dict(IMAGES[0], width=width), IMAGES[1]]
        ann_file, image_dir = write_coco_fixture(
            str(tmp_path), IMAGES, CATS, [_ann(1, bbox=[40, 2, 8, 4])]
        )
        with open(ann_file) as f:
            content = json.load(f)
        content["images"] = images
        with open(ann_file, "w") as f:
            json.dump(content, f)
        with pytest.raises(
            data.DataError,
            match=rf"image id 1: .*a\.png is 64x64 px but the annotation file says {width}x64",
        ):
            coco.coco_records(ann_file, image_dir)
        records, *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
        assert [r["image_id"] for r in records] == [2]
        assert report.counts["image size differs from the annotation file"] == 1


def test_image_resized_after_loading_is_named_by_its_batch(tmp_path):
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES[:1], CATS, [_ann(1)])
    records, *_ = coco.coco_records(ann_file, image_dir)
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    config = data.default_data_config("aitod")
    config.max_boxes, config.image_size = 4, 64
    batches = loader.make_loader(records, config, train=False, batch_size=1, seed=0)
    with pytest.raises(data.DataError, match=r"a\.png: decoded 48x32 px where its record says"):
        next(iter(batches))


def test_sixteen_bit_greyscale_is_scaled_and_rangeless_pixels_refused(tmp_path):
    values = np.array([[0, 257, 32768], [65535, 1000, 65280]], np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16") or Image.open(path).mode == "I"
    if Image.open(path).mode.startswith("I;16"):
        pixels = transforms.decode_image(path)
        assert pixels.dtype == np.uint8 and pixels.shape == (2, 3, 3)
        expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
        np.testing.assert_array_equal(pixels[..., 0], expected)  # 65535 -> 255, not all white
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    path = str(tmp_path / "float.tiff")
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    for read in (transforms.image_hw, transforms.decode_image):
        with pytest.raises(data.DataError, match=r"float\.tiff: 'F' pixels .* no fixed range"):
            read(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "12"])
def test_non_finite_or_non_numeric_box_named_at_load(tmp_path, value):
    annotation = _ann(7, bbox=[1, 2, value, 4])
    ann_file, image_dir = write_coco_fixture(str(tmp_path), IMAGES[:1], CATS, [annotation])
    if isinstance(value, str):  # a number in a string is read as the number
        (record,), *_ = coco.coco_records(ann_file, image_dir)
        np.testing.assert_allclose(record["boxes"], [[1, 2, 13, 6]])
        return
    with pytest.raises(data.DataError, match=r"annotation id 7 \(image 1\): bbox .* NaN or inf"):
        coco.coco_records(ann_file, image_dir)
    (record,), *_, report = coco.coco_records(ann_file, image_dir, lenient=True)
    assert len(record["boxes"]) == 0 and report.counts == {"non-finite bbox": 1}


def test_dota_non_finite_coordinate_named(tmp_path):
    line = "1 1 nan 1 10 10 1 10 plane 0"
    write_dota_fixture(str(tmp_path), "train", {"P0001": (64, 64, [line])})
    with pytest.raises(data.DataError, match=r"P0001\.txt:1: .* NaN or infinite"):
        dota.dota_records(str(tmp_path), "train")


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
