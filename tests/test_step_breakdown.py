"""benchmarks/step_breakdown.py, xla_cpu_flags.py, matching_speed.py, conv_speed.py and
pool_speed.py at tiny sizes on the CPU, so that they cannot rot: every part of a 1-bit + DFR
step is compiled, timed and reported, an XLA setting the compiler rejects is a reported row,
not a crash, the matching benchmark times every slot count and names the operations its
profile found, the conv benchmark times each implementation and checks its numbers against
XLA's, and the pool benchmark times both pools and compares their gradients."""

import math
import pathlib

import numpy as np
import pytest
import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_breakdown_times_every_part_of_the_dfr_step(tmp_path, capsys):
    breakdown = smoke.load_benchmark("step_breakdown")
    out = tmp_path / "rows.json"
    breakdown.main(
        ["--variants=dfr", "--size=64", "--width=tiny", "--steps=1", "--max_boxes=16",
         "--boxes=4", f"--out={out}"]
    )  # fmt: skip
    rows = __import__("json").loads(out.read_text())["rows"]
    parts = [r["part"] for r in rows]
    assert parts == [
        "backbone", "FPN", "head", "targets + L_det", "L_R", "DFR decoder + L_DFR",
        "optimizer", "sum of parts", "whole step",
    ]  # fmt: skip
    timed = [r for r in rows if r["part"] != "sum of parts"]
    assert all(r["ms"] > 0 and r["memory_gb"] > 0 for r in timed), rows
    whole = rows[-1]
    assert math.isclose(whole["share"], 1.0)
    assert math.isclose(rows[-2]["ms"], sum(r["ms"] for r in timed[:-1]))
    assert "| dfr | DFR decoder + L_DFR |" in capsys.readouterr().out


def test_flags_benchmark_reports_a_rejected_setting(monkeypatch):
    flags = smoke.load_benchmark("xla_cpu_flags")
    monkeypatch.setitem(flags.SETTINGS, "bogus", "--xla_cpu_no_such_option=1")
    args = type("Args", (), dict(size=64, batch=1, steps=1, variants="real", width="tiny"))
    (row,) = flags.run_setting("bogus", args)
    assert row["setting"] == "bogus" and row["error"], row
    table = flags.markdown([row])
    assert "| bogus | - | failed:" in table


def test_matching_benchmark_times_each_slot_count_and_profiles_it(capsys):
    bench = smoke.load_benchmark("matching_speed")
    rows = bench.main(["--size=64", "--batch=2", "--boxes=5", "--slots=4,16", "--calls=1",
                       "--profile", "--top=3"])  # fmt: skip
    assert [(r["slots"], r["real_boxes"]) for r in rows] == [(4, 4), (16, 5)]
    for row in rows:
        pairs = row["batch"] * row["anchors"] * row["slots"]
        assert row["ms"] > 0 and row["pipeline_ms"] > 0
        assert math.isclose(row["ns_per_pair"], 1e6 * row["ms"] / pairs, rel_tol=0.02)
        assert 0 < len(row["top_ms"]) <= 3 and all(ms >= 0 for ms in row["top_ms"].values())
    assert capsys.readouterr().out.count('"slots"') == 2


def test_breakdown_of_retinanet_takes_its_anchor_matches_from_the_pipeline_or_the_step(tmp_path):
    breakdown = smoke.load_benchmark("step_breakdown")
    tt = breakdown.train_throughput
    args = tt.parse_args(["--family=retinanet", "--size=64", "--batch=2", "--max_boxes=16"])
    batch = tt.random_batch(np.random.default_rng(0), 2, 64, 4, 16)
    for matching, added in (("pipeline", {"matched_slot"}), ("step", set())):
        config = tt.configure("real", args, matching=matching)
        assert config.retinanet.targets_in_pipeline == (matching == "pipeline")
        assert tt.with_pipeline_targets(config, batch).keys() - batch.keys() == added
        out = tmp_path / f"{matching}.json"
        breakdown.main(
            ["--family=retinanet", "--variants=real", "--size=64", "--width=tiny", "--steps=1",
             "--max_boxes=16", "--boxes=4", f"--matching={matching}", f"--out={out}"]
        )  # fmt: skip
        rows = __import__("json").loads(out.read_text())["rows"]
        assert [r["part"] for r in rows][:4] == ["backbone", "FPN", "head", "targets + L_det"]


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_throughput_takes_the_anchor_matches_from_the_pipeline(family, tmp_path):
    tt = smoke.load_benchmark("train_throughput")
    args = tt.parse_args(
        [f"--family={family}", "--size=64", "--batch=2", "--steps=1", "--width=tiny",
         "--max_boxes=256", "--boxes=4", "--workers=0", "--num_images=4", "--variants=real",
         f"--data_root={tmp_path}", "--matching=pipeline", "--pipeline=both"]
    )  # fmt: skip
    rows = tt.time_jax(family, "real", "bucketed", "pipeline", args)
    assert [r["pipeline"] for r in rows] == ["off", "on"]
    assert {r["matching"] for r in rows} == {"pipeline"}
    assert all(r["images_per_second"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        tt.parse_args(["--matching=pipeline,dense"])


def test_conv_speed_times_each_implementation_and_checks_their_numbers(tmp_path, capsys):
    bench = smoke.load_benchmark("conv_speed")
    out = tmp_path / "rows.json"
    bench.main(["--size=8", "--channels=8", "--batch=1", "--steps=1", f"--out={out}"])
    rows = __import__("json").loads(out.read_text())["rows"]
    assert len(rows) >= 2  # XLA's and this project's; torch's only where it is installed
    for row in rows:
        for key in ("forward_ms", "input_grad_ms", "kernel_grad_ms", "train_ms"):
            assert row[key] > 0, row
    assert all(row["max_relative_error"] < 1e-5 for row in rows[1:]), rows
    assert "kernel gradient by taps" in capsys.readouterr().out


def test_conv_speed_sweep_marks_the_sizes_the_tap_sum_serves(monkeypatch, capsys):
    bench = smoke.load_benchmark("conv_speed")
    monkeypatch.setattr(bench, "SWEEP", ((1, 4, 8), (2, 8, 8)))
    monkeypatch.setattr(bench.conv_lib, "MIN_MULTIPLY_ADDS_PER_TAP", 2 * 8 * 8 * 8 * 8)
    bench.main(["--sweep", "--steps=1"])
    assert bench.conv_lib.MIN_MULTIPLY_ADDS_PER_TAP == 2 * 8 * 8 * 8 * 8  # restored
    table = capsys.readouterr().out
    assert "| 1 x 4 x 8 | 2^10.0 |" in table and table.rstrip().endswith("| yes |"), table
    assert "| no |" in table


def test_pool_speed_times_both_pools_and_finds_their_gradients_equal():
    """Also the check that a whole ResNet, compiled as one program (where XLA fuses the pool's
    input and its backward pass with their neighbours), trains bit-identically with
    layers.max_pool and with flax's pool."""
    bench = smoke.load_benchmark("pool_speed")
    result = bench.main(["--size=64", "--width=8", "--batch=2", "--calls=2"])
    assert [r["pool"] for r in result["rows"]] == ["flax.linen.max_pool", "layers.max_pool"]
    assert all(len(r["ms"]) == 2 and r["median_ms"] > 0 for r in result["rows"])
    assert result["max_gradient_difference"] == 0.0


def test_breakdown_compares_parts_with_torchvision_and_refuses_other_settings():
    breakdown = smoke.load_benchmark("step_breakdown")
    rows = [
        {"variant": variant, "part": part, "ms": ms}
        for variant, times in (("real", (300.0, 900.0)), ("torchvision", (200.0, 600.0)))
        for part, ms in zip(("head", "whole step"), times, strict=True)
    ]
    table = breakdown.against_torchvision(rows)
    assert "| head | 300 | 200 | 1.50x |" in table and "| whole step | 900 | 600 | 1.50x |" in table
    assert breakdown.against_torchvision(rows[:2]) == ""  # no torchvision rows
    with pytest.raises(SystemExit):
        breakdown.main(["--family=retinanet", "--torchvision"])
