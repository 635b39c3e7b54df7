"""Sliced inference (dfrdet_jax/sliced.py, dfrdet_jax/predict.py): tiles cover the image, objects
on tile borders are found exactly once, one tile is exactly the non-tiled inference, and the
predict mode's warnings and drawings."""

import logging

import jax
import numpy as np
import pytest
import smoke
from PIL import Image

from dfrdet_jax import data, evaluate, predict, sharding, sliced, steps
from dfrdet_jax.data.sources import synthetic
from dfrdet_jax.models import registry
from dfrdet_jax.ops.nms import Detections

TILE, OVERLAP = 96, 32


def test_tile_origins_cover_the_image_and_end_at_its_edges():
    origins = sliced.tile_origins(200, 300, TILE, OVERLAP)
    xs, ys = sorted(set(origins[:, 0])), sorted(set(origins[:, 1]))
    assert xs == [0, 64, 128, 192, 204] and ys == [0, 64, 104]
    assert len(origins) == len(xs) * len(ys)
    covered = np.zeros((200, 300), bool)
    for x, y in origins:
        covered[y : y + TILE, x : x + TILE] = True
    assert covered.all()
    np.testing.assert_array_equal(sliced.tile_origins(50, 80, TILE, OVERLAP), [[0, 0]])


def _oracle(gt_boxes, gt_classes, image_size, slots=64):
    """A perfect detector: in each tile, the visible part of every object of the scene (a box cut
    where the tile ends), in the batch's resized pixels, as the model's Detections."""

    def detect(batch):
        size = len(batch["image"])
        boxes = np.zeros((size, slots, 4), np.float32)
        scores = np.zeros((size, slots), np.float32)
        classes = np.zeros((size, slots), np.int32)
        valid = np.zeros((size, slots), bool)
        for i in range(size):
            if batch["image_id"][i] < 0:
                continue
            x0, y0 = batch["tile_offset"][i]
            h, w = batch["image_hw"][i] / batch["scale"][i]
            visible = np.clip(gt_boxes, [x0, y0, x0, y0], [x0 + w, y0 + h, x0 + w, y0 + h])
            seen = (visible[:, 2] > visible[:, 0]) & (visible[:, 3] > visible[:, 1])
            n = int(seen.sum())
            boxes[i, :n] = (visible[seen] - [x0, y0, x0, y0]) * batch["scale"][i]
            scores[i, :n] = 0.9 - 0.001 * np.flatnonzero(seen)  # distinct, object by object
            classes[i, :n] = gt_classes[seen]
            valid[i, :n] = True
        return Detections(boxes, scores, classes, valid)

    return detect


@pytest.mark.parametrize("image_size", [TILE, TILE // 2])  # tiles at or shrunk to the model's size
def test_objects_on_tile_borders_are_found_exactly_once(image_size):
    rng = np.random.default_rng(3)
    image, objects = synthetic.generate_scene(rng, 260, 60, 6, 24, 0)  # every object < overlap
    gt = np.array([[x, y, x + w, y + h] for _, x, y, w, h in objects], np.float32)
    classes = np.array([c for c, *_ in objects], np.int32)
    origins = sliced.tile_origins(260, 260, TILE, OVERLAP)
    on_border = [
        any(
            (b[0] < x + TILE <= b[2] and x + TILE < 260)
            or (b[1] < y + TILE <= b[3] and y + TILE < 260)
            for x, y in origins
        )
        for b in gt
    ]
    assert sum(on_border) >= 5  # the scene tests what it should
    tiles_done = []
    found = sliced.detect_image(
        _oracle(gt, classes, image_size),
        image,
        tile=TILE,
        overlap=OVERLAP,
        image_size=image_size,
        batch_size=4,
        merge_iou=0.5,
        on_tiles=tiles_done.append,
    )
    assert sum(tiles_done) == len(origins)
    order = np.argsort(-found.scores)  # the oracle scores object k as 0.9 - 0.001 k
    np.testing.assert_array_equal(np.round((0.9 - found.scores[order]) / 0.001), np.arange(len(gt)))
    np.testing.assert_allclose(found.boxes[order], gt, atol=1e-3)
    np.testing.assert_array_equal(found.classes[order], classes)


def test_an_object_larger_than_the_overlap_is_kept():
    # Cut by every tile edge it meets and whole in no tile: its views are kept, never dropped.
    gt = np.array([[80, 10, 140, 40]], np.float32)
    found = sliced.detect_image(
        _oracle(gt, np.zeros(1, np.int32), TILE),
        np.zeros((120, 200, 3), np.uint8),
        tile=TILE,
        overlap=OVERLAP,
        image_size=TILE,
        batch_size=2,
        merge_iou=0.5,
    )
    assert len(found.boxes) >= 1
    assert found.boxes[:, 0].min() == pytest.approx(80) and found.boxes[
        :, 2
    ].max() == pytest.approx(140)


@pytest.fixture(scope="module")
def model_and_state():
    config = smoke.smoke_config("real")
    config.postprocess.score_threshold = 0.0  # an untrained model still detects
    model = registry.build_model(config, num_classes=8)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 1)
    mesh = sharding.make_mesh()
    return config, model, jax.device_put(state, sharding.replicated_sharding(mesh)), mesh


def test_one_tile_equals_the_non_tiled_inference(model_and_state, tmp_path):
    config, model, state, mesh = model_and_state
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    # Non-tiled: the evaluation pipeline's resize, pad and batch of a file.
    record = {
        "path": str(tmp_path / "a.png"),
        "image_id": 5,
        "hw": (48, 64),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int32),
        "ignore": np.zeros(0, bool),
    }
    loader = data.loader.make_loader([record], config.data, train=False, batch_size=2, seed=0)
    dataset = type("Split", (), {"loader": loader, "category_ids": list(range(1, 9))})
    expected = evaluate.predict_dataset(config, model, state, mesh, dataset).to_coco()
    predict = evaluate.predict_fn(config, model, mesh)
    for tile in (64, 100):  # the model's size, and a tile larger than the image
        found = sliced.detect_image(
            lambda batch: predict(state, batch)[0],
            pixels,
            tile=tile,
            overlap=16,
            image_size=64,
            batch_size=2,
            merge_iou=0.5,
        ).to_coco(5, list(range(1, 9)))
        assert len(found) == len(expected) > 0
        key = lambda r: (-r["score"], r["category_id"], r["bbox"])  # noqa: E731
        for got, want in zip(sorted(found, key=key), sorted(expected, key=key), strict=True):
            assert got["category_id"] == want["category_id"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-6)
            np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1e-3)


def test_whole_mode_warns_when_it_shrinks_an_image_and_drawings_are_bounded(
    model_and_state, tmp_path, caplog
):
    config, model, state, mesh = model_and_state
    config = config.copy_and_resolve_references()
    config.predict.mode = "whole"
    config.predict.max_drawn_side = 100
    info = data.dataset_info(config.data)
    predictor = predict.Predictor(config, model, state, mesh, info)
    image = np.zeros((300, 200, 3), np.uint8)
    with caplog.at_level(logging.WARNING):
        results = predictor(image)
    assert "shrinks them 4.7 times" in caplog.text
    assert all(r["bbox"][0] + r["bbox"][2] <= 200 + 1e-3 for r in results)
    predict._draw(predictor, image, results, str(tmp_path / "drawn.png"))
    assert Image.open(tmp_path / "drawn.png").size == (67, 100)
    config.predict.mode = "tiles"  # at the model's size: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict.Predictor(config, model, state, mesh, info)(image)
    assert "shrinks" not in caplog.text
    config.predict.tile_overlap = 1.0
    with pytest.raises(ValueError, match=r"tile_overlap is a fraction of the tile"):
        predict.Predictor(config, model, state, mesh, info)
