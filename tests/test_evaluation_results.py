"""COCO results conversion, bad-input handling and the command line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from test_evaluation_aitod import det, make_gt

from dfrdet_jax import evaluation
from dfrdet_jax.evaluation import __main__ as cli


def test_detections_to_coco_rescales_and_skips_padding():
    boxes = np.zeros((3, 2, 4), np.float32)
    boxes[0, 0] = [10, 20, 30, 60]
    boxes[0, 1] = [0, 0, 4, 4]
    boxes[1, 0] = [2, 2, 6, 6]
    boxes[2, 0] = [1, 1, 2, 2]
    out = evaluation.detections_to_coco(
        boxes,
        scores=np.array([[0.9, 0.1], [0.8, 0.0], [0.7, 0.0]]),
        classes=np.array([[1, 0], [0, 0], [0, 0]]),
        valid=np.array([[True, False], [True, False], [True, False]]),
        image_ids=np.array([7, 8, -1]),  # the last image is batch padding
        scales=np.array([2.0, 0.5, 1.0]),
        category_ids=[3, 9],
    )
    assert out == [
        {"image_id": 7, "category_id": 9, "bbox": [5.0, 10.0, 10.0, 20.0], "score": 0.9},
        {"image_id": 8, "category_id": 3, "bbox": [4.0, 4.0, 8.0, 8.0], "score": 0.8},
    ]
    json.dumps(out)  # plain Python scalars


GT = make_gt({1: [(1, [10, 10, 20, 20])], 2: [(1, [5, 5, 8, 8])]})


@pytest.mark.parametrize(
    "bad, match",
    [
        (det(3, [0, 0, 5, 5], 0.5), r"record #1 has image_id 3"),
        (det(1, [0, 0, 5, 5], 0.5, category_id=4), r"record #1 has category_id 4"),
        (det("1", [0, 0, 5, 5], 0.5), r"record #1 needs an integer image_id"),
        (det(1, [0, math.nan, 5, 5], 0.5), r"record #1 has a NaN"),
        (det(1, [0, 0, 5, 5], math.inf), r"record #1 has a NaN"),
        (det(1, [0, 0, -5, 5], 0.5), r"record #1 has a negative width"),
        (det(1, [0, 0, 5], 0.5), r"record #1 needs bbox"),
        (det(1, [0, 0, 5, 5], "0.5"), r"record #1 needs bbox .* all numbers"),
        (det(1, [0, "0", 5, 5], 0.5), r"record #1 needs bbox .* all numbers"),
        (det(1, [0, 0, 5, 5], None), r"record #1 needs bbox .* all numbers"),
        ({"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, r"record #1 needs keys"),
    ],
)
def test_bad_detections_name_the_record(bad, match):
    dets = [det(1, [10, 10, 20, 20], 0.9), bad]
    with pytest.raises(evaluation.EvaluationInputError, match=match):
        evaluation.evaluate(GT, dets)


def test_empty_detections_score_zero(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    for protocol in evaluation.PROTOCOLS:
        for source in ([], str(path)):
            m = evaluation.evaluate(GT, source, protocol=protocol)
            headline = {
                "aitod": "AP",
                "tinyperson": "AP50_tiny",
                "dota": "mAP50",
                "dota_aitod": "AP",
            }[protocol]
            assert m[headline] == 0.0 and m["num_detections"] == 0


def test_zero_byte_results_file_is_an_error(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("")
    with pytest.raises(evaluation.EvaluationInputError, match="results.json is empty"):
        evaluation.evaluate(GT, str(path))


def test_zero_area_ground_truth_is_counted_not_scored():
    gt = make_gt({1: [(1, [10, 10, 20, 20]), (1, [40, 40, 0, 5])]})
    m = evaluation.evaluate(gt, [det(1, [10, 10, 20, 20], 0.9)])
    assert m["skipped"] == {"gt_zero_area": 1}
    assert m["AR@1500"] == pytest.approx(1.0)
    assert "gt_zero_area" in evaluation.format_table(m)
    assert len(gt["annotations"]) == 2  # the caller's dict is not modified


def test_nan_ground_truth_is_an_error():
    gt = make_gt({1: [(1, [10, 10, math.nan, 20])]})
    with pytest.raises(evaluation.EvaluationInputError, match="annotation #0"):
        evaluation.evaluate(gt, [])


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    gt_path, dt_path, out = tmp_path / "gt.json", tmp_path / "dt.json", tmp_path / "m.json"
    gt_path.write_text(json.dumps(GT))
    dt_path.write_text(json.dumps([det(1, [10, 10, 20, 20], 0.9)]))
    code = cli.main(["--gt", str(gt_path), "--dt", str(dt_path), "--out", str(out)])
    assert code == 0
    assert "Average Precision" in capsys.readouterr().out
    assert json.loads(out.read_text())["AR@1500"] == pytest.approx(0.5)
    dt_path.write_text(json.dumps([det(9, [10, 10, 20, 20], 0.9)]))
    assert cli.main(["--gt", str(gt_path), "--dt", str(dt_path), "--out", str(out)]) == 2
    assert "image_id 9" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["image", "annotation"])
def test_repeated_ids_in_the_ground_truth_are_an_error(what):
    gt = json.loads(json.dumps(GT))
    records = gt["images"] if what == "image" else gt["annotations"]
    records[1]["id"] = records[0]["id"]
    with pytest.raises(evaluation.EvaluationInputError, match=rf"{what} id 1 is used 2 times"):
        evaluation.evaluate(gt, [det(1, [10, 10, 20, 20], 0.9)])


def test_cli_names_a_ground_truth_list_and_a_results_folder(tmp_path, capsys):
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps([GT]))
    dt_path.write_text(json.dumps([det(1, [10, 10, 20, 20], 0.9)]))
    assert cli.main(["--gt", str(gt_path), "--dt", str(dt_path)]) == 2
    assert "gt.json: COCO ground truth is a JSON object" in capsys.readouterr().err
    gt_path.write_text(json.dumps(GT))
    assert cli.main(["--gt", str(gt_path), "--dt", str(tmp_path)]) == 2
    assert f"Results {tmp_path} is a folder" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(GT))
    dt_path.write_text("[]")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfrdet_jax.evaluation",
            "--gt",
            str(gt_path),
            "--dt",
            str(dt_path),
            "--protocol",
            "dota",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mAP50 = 0.00" in proc.stdout
    assert json.loads((tmp_path / "dt.json.metrics.json").read_text())["mAP50"] == 0.0


def test_ground_truth_with_unknown_image_is_an_error():
    gt = make_gt({1: [(1, [10, 10, 20, 20])]})
    gt["annotations"][0]["image_id"] = 42
    with pytest.raises(evaluation.EvaluationInputError, match="annotation #0"):
        evaluation.evaluate(gt, [])
