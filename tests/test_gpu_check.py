"""benchmarks/gpu_check.py: the whole check at tiny sizes on the CPU (so that it cannot rot before
a GPU runs it), its per-part time limits and failures, and the report's arithmetic."""

import json
import pathlib
import sys

import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]


gpu_check = smoke.load_benchmark("gpu_check")


def test_tiny_check_on_cpu_reports_every_part(tmp_path):
    argv = [
        f"--out_dir={tmp_path}",
        "--size=64",
        "--batch=2",
        "--steps=1",
        "--width=tiny",
        "--families=fcos",
        "--variants=real",
        "--dtypes=float32",
        "--eval_images=3",
        "--eval_dets=5",
        "--workers=0",
        "--concurrency=1",
        "--part_timeout=300",
        "--total_timeout=500",
    ]
    gpu_check.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    status = {p["name"]: p["status"] for p in results["parts"]}
    assert status == {"eval": "ok", "fcos real float32": "ok"}, results["parts"]
    (train,) = [p for p in results["parts"] if p["name"] == "fcos real float32"]
    assert [r["pipeline"] for r in train["results"]] == ["off", "on"]
    for row in train["results"]:
        assert row["images_per_second"] > 0 and row["flops_per_step"] > 0
        assert row["step_memory_gb"] > 0 and row["device_kind"] == "cpu"
    report = (tmp_path / "report.md").read_text()
    assert "| jax fcos real | float32 | fixed batch |" in report
    assert "| jax fcos real | float32 | pipeline |" in report
    assert "fcos real float32: " in report.split("## Input pipeline")[1]  # the slowdown line
    assert "3 images x 5 detections" in report
    assert "jax " in report and "versions:" in report


def test_parts_stop_at_their_limits_and_failures_keep_their_log(tmp_path):
    args = gpu_check.parse_args(
        [f"--out_dir={tmp_path}", "--concurrency=2", "--part_timeout=2", "--total_timeout=60"]
    )
    python = sys.executable
    parts = [
        gpu_check.Part("slow", [python, "-c", "import time; time.sleep(60)"]),
        gpu_check.Part("broken", [python, "-c", "raise SystemExit('no such model: xyz')"]),
        gpu_check.Part("fine", [python, "-c", "print('{\"images_per_second\": 3}')"]),
        gpu_check.Part("silent", [python, "-c", "print('nothing to parse')"], uses_device=False),
    ]
    gpu_check.run_parts(parts, args, tmp_path, env=None)
    by_name = {p.name: p for p in parts}
    assert by_name["slow"].status == "timed out" and by_name["slow"].seconds < 30
    assert by_name["broken"].status == "failed"
    assert "no such model: xyz" in by_name["broken"].note
    assert by_name["fine"].status == "ok"
    assert by_name["fine"].results == [{"images_per_second": 3}]
    assert by_name["silent"].status == "no result"

    args = gpu_check.parse_args([f"--out_dir={tmp_path}", "--total_timeout=0"])
    late = [gpu_check.Part("late", [python, "-c", "pass"])]
    gpu_check.run_parts(late, args, tmp_path, env=None)
    assert late[0].status == "skipped"


def _row(variant, step_ms, memory, framework="jax", flops=None, dtype="bfloat16"):
    return {
        "framework": framework,
        "family": "fcos",
        "variant": variant,
        "dtype": dtype,
        "pipeline": "off",
        "images_per_second": 8000 / step_ms,
        "step_ms": step_ms,
        "step_memory_gb": memory,
        "flops_per_step": flops,
        "device_kind": "NVIDIA H200",
        "num_devices": 1,
    }


def test_report_mfu_and_ratios_by_hand(tmp_path):
    args = gpu_check.parse_args([f"--out_dir={tmp_path}", "--batch=8"])
    part = gpu_check.Part("fcos", [], status="ok")
    # 98.94 TFLOP in 1 s = 98.94 TFLOP/s: 10.0 % of the H200's dense bf16 peak (989.4).
    part.results = [
        _row("real", 1000.0, 2.0, flops=98.94e12),
        _row("bnn", 1250.0, 3.0),
        _row("real", 500.0, 1.0, framework="torchvision"),
    ]
    report = gpu_check.report([part], args, wall_s=1.0)
    assert "| 98.94 | 10.0 % |" in report
    assert "- FCOS bnn / real (bfloat16): step time 1.25x, memory 1.50x" in report
    assert "- FCOS real, ours / torchvision (bfloat16): step time 2.00x, memory 2.00x" in report
