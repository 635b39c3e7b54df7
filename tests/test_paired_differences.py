"""benchmarks/paired_differences.py: one row against another paired by seed, per results file
and pooled over files, worked by hand; files without a row are listed, not dropped silently."""

import json
import math

import pytest
import smoke

from dfrdet_jax import experiments


def _results_file(path, rows):
    """An experiments.py results JSON whose rows hold {seed: AP} (every metric that AP)."""
    runs = {
        row: {str(seed): dict.fromkeys(experiments.TABLE_METRICS, ap) for seed, ap in aps.items()}
        for row, aps in rows.items()
    }
    path.write_text(json.dumps({"detector": "fcos", "command": "CMD", "runs": runs}))
    return str(path)


def test_per_file_and_pooled_differences_by_hand(tmp_path, capsys):
    script = smoke.load_benchmark("paired_differences")
    first = _results_file(
        tmp_path / "a.json",
        {"dfr": {0: 0.50, 1: 0.52, 2: 0.51}, "zero": {0: 0.49, 1: 0.50, 2: 0.52}},
    )  # differences 1, 2, -1 (%)
    second = _results_file(
        tmp_path / "b.json",
        {"dfr": {0: 0.40, 1: 0.44, 3: 0.90}, "zero": {0: 0.40, 1: 0.40, 2: 0.10}},
    )  # seeds 0 and 1 in both: differences 0, 4
    lacking = _results_file(tmp_path / "c.json", {"dfr": {0: 0.5}, "bnn": {0: 0.4}})
    result = script.main([first, second, lacking, "--rows", "dfr,zero"])
    a, b = result["files"]
    assert a["seeds"] == 3 and a["AP"] == pytest.approx((2 / 3, math.sqrt(7 / 3) / math.sqrt(3)))
    assert b["seeds"] == 2 and b["AP_vt"] == pytest.approx((2.0, 2.0))  # std sqrt(8), / sqrt(2)
    pooled = [1, 2, -1, 0, 4]
    mean = sum(pooled) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in pooled) / 4)
    assert result["pooled"]["pairs"] == 5
    assert result["pooled"]["AP_t"] == pytest.approx((mean, std / math.sqrt(5)))
    assert result["missing"] == [(lacking, ["zero"])]
    out = capsys.readouterr().out
    assert f"| **pooled, every seed once** | 5 | +{mean:.2f} ({std / math.sqrt(5):.2f})" in out
    assert "c.json: no zero" in out


def test_rows_must_be_two_names(tmp_path):
    script = smoke.load_benchmark("paired_differences")
    path = _results_file(tmp_path / "a.json", {"dfr": {0: 0.5}})
    with pytest.raises(SystemExit):
        script.main([path, "--rows", "dfr"])
