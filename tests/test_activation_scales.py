"""benchmarks/activation_scales.py: the size of every FPN level, head branch (FCOS's towers,
Faster R-CNN's RPN) and DFR decoder stage, checked against numpy over the concatenated
batches, and run on a saved run's chosen checkpoints."""

import json
import pathlib

import jax
import numpy as np
import pytest
import smoke

from dfrdet_jax import data as data_lib
from dfrdet_jax import steps
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "variant, family, branches",
    [
        ("bnn", "fcos", ["head/cls_tower0/norm", "head/reg_tower0/norm"]),
        ("dfr", "fcos", ["head/cls_tower0/norm", "head/reg_tower0/norm"]),
        ("bnn", "faster_rcnn", ["head/rpn/rpn_conv0/norm"]),
        # model.head_level_norms: each level's norm of the first units on its own
        (
            "bnn",
            "fcos",
            [f"head/{t}0/norm_level{i}" for t in ("cls_tower", "reg_tower") for i in range(3)],
        ),
    ],
)
def test_scales_are_numpys_over_every_batch(variant, family, branches):
    script = smoke.load_benchmark("activation_scales")
    config = smoke.smoke_config(variant, family)
    config.model.head_level_norms = branches[0].split("/")[-1] != "norm"
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 10)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batches = [smoke.make_batch(seed=s) for s in (0, 1)]
    got = script.scales(config, model, variables, batches)
    levels = [f"P{v}" for v in range(config.model.min_level, config.model.max_level + 1)]
    decoder = ["decoder/deconv0", "decoder/fuse", "decoder/block0", "decoder/project"]
    if variant == "dfr":
        assert set(levels + branches + decoder + ["reconstruction"]) <= set(got)
    else:
        assert sorted(got) == sorted(levels + branches)
    for name in branches:  # GroupNorm's output at its initial scale 1, bias 0: unit RMS
        assert got[name]["rms"] == pytest.approx(1.0, abs=0.01), name
    outputs_of = script.compiled_feature_outputs(config, model)  # what ``scales`` reads
    outputs = [outputs_of(variables, b) for b in batches]
    for name, values in got.items():
        x = np.concatenate([np.asarray(o[name], np.float64).ravel() for o in outputs])
        assert values["rms"] == pytest.approx(np.sqrt(np.mean(x * x)), rel=1e-9), name
        assert values["mean_abs"] == pytest.approx(np.mean(np.abs(x)), rel=1e-9), name
        assert values["max_abs"] == pytest.approx(np.max(np.abs(x)), rel=1e-9), name
    with pytest.raises(ValueError, match="no batches"):
        script.scales(config, model, variables, [])


def test_main_reads_the_chosen_checkpoints(tmp_path, capsys):
    config = smoke.smoke_config("dfr")
    num_classes = data_lib.dataset_info(config.data).num_classes
    workdir, out = tmp_path / "run", tmp_path / "rows.json"
    smoke.save_run(workdir, config, [2], num_classes=num_classes)
    smoke.save_run(workdir, config, [3], num_classes=num_classes, shift=0.05)
    script = smoke.load_benchmark("activation_scales")
    rows = script.main([f"--workdir={workdir}", "--steps=2,3", "--batches=1", f"--out={out}"])
    assert json.loads(out.read_text()) == rows
    by_step = {s: {r["output"]: r["rms"] for r in rows if r["step"] == s} for s in (2, 3)}
    assert by_step[2].keys() == by_step[3].keys() and "P2" in by_step[2]
    assert by_step[2]["P2"] != by_step[3]["P2"]  # the shifted parameters were read
    latest = script.main([f"--workdir={workdir}", "--batches=1"])
    assert {r["step"] for r in latest} == {3}
    assert "| 3 | P2 |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"No latest checkpoint 7 .*\[2, 3\]"):
        script.main([f"--workdir={workdir}", "--steps=7", "--batches=1"])
