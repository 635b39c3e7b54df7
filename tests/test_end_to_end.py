"""Every detector family trains, evaluates, predicts and exports through ``dfrdet_jax.main``
(FCOS's training runs are in test_resume.py), and the evaluation path scores exactly: the exact
AI-TOD metric set, the eval mode equal to scoring the predict mode's output, and the ground
truth fed back as detections scoring AP 1 (none: AP 0)."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import resume_config

from dfrdet_jax import data, evaluate, evaluation, export, main
from dfrdet_jax import predict as dfrdet_predict
from dfrdet_jax.data.sources import synthetic

# What the 'aitod' protocol returns (dfrdet_jax/evaluation/api.py and coco_tiny.py).
AITOD_HEADLINE = {"AP", "AP50", "AP75", "AP_vt", "AP_t", "AP_s", "AP_m"}
AITOD_HEADLINE |= {"AR@1", "AR@100", "AR@300", "AR@1500", "AR_vt", "AR_t", "AR_s", "AR_m"}
AITOD_HEADLINE |= {"oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN"}
AITOD_KEYS = AITOD_HEADLINE | {"per_class", "summary", "protocol", "backend"}
AITOD_KEYS |= {"num_images", "num_detections", "skipped"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_trains_evaluates_predicts_and_exports_through_main(tmp_path, monkeypatch, family):
    monkeypatch.setenv("DFRDET_TEST_DATA", str(tmp_path / "data"))
    config = resume_config.get_config(family)
    config.train.num_steps = 3
    config.postprocess.score_threshold = 0.0  # an untrained detector still gives detections
    workdir = tmp_path / "run"
    state, metrics = main.run("train", config, str(workdir))
    assert int(state.step) == 3
    assert metrics.keys() == AITOD_KEYS
    assert metrics["per_class"].keys() == set(synthetic.CLASS_NAMES)
    assert all(m.keys() == AITOD_HEADLINE for m in metrics["per_class"].values())
    assert (metrics["protocol"], metrics["num_images"]) == ("aitod", config.data.synthetic.num_val)
    assert metrics["num_detections"] > 0
    assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1 for k in AITOD_HEADLINE)
    # The eval mode restores the final checkpoint: the training run's last evaluation again.
    eval_metrics = main.run("eval", config, str(workdir))
    assert eval_metrics == metrics

    # The predict mode's results on the same images, scored on the split's ground truth.
    gt_file = data.load_records(config.data, config.eval.split).annotation_file
    (images,) = (tmp_path / "data").glob("*/val")
    (images / "README.txt").write_text("a file that is not an image")
    out_dir = main.run("predict", config, str(workdir), input_path=str(images))
    with open(f"{out_dir}/images.json") as f:
        files = json.load(f)
    with open(f"{out_dir}/skipped_files.json") as f:
        assert json.load(f) == [str(images / "README.txt")]  # listed, not silently left out
    with open(f"{out_dir}/results.json") as f:
        predicted = json.load(f)
    with open(gt_file) as f:
        gt_ids = {image["file_name"]: image["id"] for image in json.load(f)["images"]}
    for result in predicted:  # predict numbers images by their place in the sorted file list
        result["image_id"] = gt_ids[os.path.basename(files[result["image_id"]])]
    assert evaluation.evaluate(gt_file, predicted, protocol=config.eval.protocol) == eval_metrics

    out_dir = main.run("export", config, str(workdir))
    if family == "retinanet":  # once: the path is the same for every family
        _check_deployed_predict(tmp_path, out_dir, images, files, gt_ids, predicted)
    _check_export_tensors(config, workdir, out_dir, family)


def _check_export_tensors(config, workdir, out_dir, family):
    """The export is bit-packed and gives the checkpoint's outputs."""
    variables, manifest = export.load_export(out_dir)
    assert (manifest["model"], manifest["step"]) == (family, 3) and manifest["packed_kernels"]
    assert manifest["file_bytes"] < 2 * manifest["size_mb"] * 1e6 + 100_000  # bits, not floats
    model, state, _, _ = evaluate.restored_state(config, str(workdir))
    images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    # Under one jit: op by op, every op would compile alone.
    apply = jax.jit(functools.partial(model.apply, train=False))
    expected = apply({"params": state.params, "batch_stats": state.batch_stats}, images)
    got = apply(variables, images)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)


def _check_deployed_predict(tmp_path, out_dir, images, files, gt_ids, predicted):
    """The export folder alone predicts what the workdir's checkpoint predicts."""
    deployed = tmp_path / "deployed"
    dfrdet_predict.main(["--export", out_dir, "--input", str(images), "--out", str(deployed)])
    with open(deployed / "results.json") as f:
        from_export = json.load(f)
    for result in from_export:
        result["image_id"] = gt_ids[os.path.basename(files[result["image_id"]])]
    assert len(from_export) == len(predicted)
    for got, want in zip(from_export, predicted, strict=True):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        np.testing.assert_allclose(got["bbox"], want["bbox"], rtol=1e-4, atol=1e-3)
        assert got["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(("fed_back", "expected_ap"), [(True, 1.0), (False, 0.0)])
def test_the_ground_truth_fed_back_as_detections_scores_ap_one(tmp_path, fed_back, expected_ap):
    # The eval mode's path around the model: the eval split's batches (64 px images resized to
    # 48 px), their boxes as score-1 detections through detections_to_coco (back to original
    # pixels), then evaluation.evaluate on the split's COCO json, as evaluate.evaluate_state.
    gt_file, _ = data.ensure_synthetic(
        str(tmp_path), num_train=1, num_val=4, num_test=1, image_size=64, max_size=24
    )["val"]
    config = data.default_data_config("aitod")  # a COCO json and an image folder per split
    config.root = os.path.dirname(gt_file)
    config.ann_pattern, config.image_pattern = "{split}.json", "{split}"
    config.image_size = 48
    dataset = data.build_dataset(config, "val", train=False, batch_size=3, seed=0)
    results = []
    for batch in dataset.loader:
        assert np.all(batch["scale"][batch["image_id"] >= 0] == 0.75)
        results += evaluation.detections_to_coco(
            batch["boxes"],
            np.ones(batch["labels"].shape),
            batch["labels"],
            batch["box_valid"] & fed_back,
            batch["image_id"],  # the final batch's pad image has id -1 and is skipped
            batch["scale"],
            dataset.category_ids,
        )
    metrics = evaluation.evaluate(dataset.annotation_file, results, protocol="aitod")
    with open(gt_file) as f:
        num_boxes = len(json.load(f)["annotations"])
    assert num_boxes > 0 and metrics["num_images"] == 4
    assert metrics["num_detections"] == (num_boxes if fed_back else 0)
    for key in ("AP", "AP50", "AP75", "AR@1500"):
        assert metrics[key] == expected_ap, key
