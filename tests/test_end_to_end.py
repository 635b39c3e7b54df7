"""Every detector family trains, evaluates, predicts and exports through ``dfrdet_jax.main``
(FCOS's training runs are in test_resume.py)."""

import json

import jax
import numpy as np
import pytest
import resume_config

from dfrdet_jax import evaluate, export, main


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_trains_evaluates_predicts_and_exports_through_main(tmp_path, monkeypatch, family):
    monkeypatch.setenv("DFRDET_TEST_DATA", str(tmp_path / "data"))
    config = resume_config.get_config(family)
    config.train.num_steps = 3
    workdir = tmp_path / "run"
    state, metrics = main.run("train", config, str(workdir))
    assert int(state.step) == 3
    assert {"AP", "AP50", "AP75", "AP_vt", "AP_t", "AP_s", "AP_m"} <= metrics.keys()
    assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1 for k in ("AP", "AP_vt"))
    assert main.run("eval", config, str(workdir))["AP"] == pytest.approx(metrics["AP"])

    (images,) = (tmp_path / "data").glob("*/val")
    out_dir = main.run("predict", config, str(workdir), input_path=str(images))
    with open(f"{out_dir}/images.json") as f:
        files = json.load(f)
    assert len(files) == config.data.synthetic.num_val
    with open(f"{out_dir}/results.json") as f:
        assert all(0 <= r["image_id"] < len(files) for r in json.load(f))

    out_dir = main.run("export", config, str(workdir))
    variables, manifest = export.load_export(out_dir)
    assert (manifest["model"], manifest["step"]) == (family, 3) and manifest["packed_kernels"]
    assert manifest["file_bytes"] < 2 * manifest["size_mb"] * 1e6 + 100_000  # bits, not floats
    model, state, _, _ = evaluate.restored_state(config, str(workdir))
    images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    expected = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    got = model.apply(variables, images, train=False)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)
