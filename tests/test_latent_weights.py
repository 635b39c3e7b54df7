"""benchmarks/latent_weights.py: sign flips since the start, weights near zero and alpha against
mean|w|, checked against numpy on two saved runs."""

import json

import jax
import numpy as np
import pytest
import smoke

from dfrdet_jax import data as data_lib


def _binary_layers(params):
    """{layer path: (kernel, alpha)} of the layers with a learned alpha (every 1-bit layer of
    the smoke bnn)."""
    flat = {
        tuple(k.key for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    return {p[:-1]: (flat[(*p[:-1], "kernel")], v) for p, v in flat.items() if p[-1] == "alpha"}


def _mean_abs(w):
    return np.abs(w).reshape(-1, w.shape[-1]).mean(0)


def test_stats_are_numpys_against_the_start(tmp_path, capsys):
    config = smoke.smoke_config("bnn")
    num_classes = data_lib.dataset_info(config.data).num_classes
    start_dir, run_dir, out = tmp_path / "start", tmp_path / "run", tmp_path / "rows.json"
    start = smoke.save_run(start_dir, config, [1], num_classes=num_classes)
    config.init_from, config.init_from_checkpoint = str(start_dir), "best"
    # The same draw shifted by 0.01: the negative weights above -0.01 change sign.
    run = smoke.save_run(run_dir, config, [2], num_classes=num_classes, shift=0.01)
    script = smoke.load_benchmark("latent_weights")
    rows = script.main([str(run_dir), f"--out={out}"])
    assert json.loads(out.read_text()) == rows
    [row] = rows
    layers, start_layers = _binary_layers(run.params), _binary_layers(start.params)
    weights = sum(w.size for w, _ in layers.values())
    flipped = sum(np.sum(np.sign(w) != np.sign(start_layers[p][0])) for p, (w, _) in layers.items())
    near = sum(np.sum(np.abs(w) < 0.25 * _mean_abs(w)) for w, _ in layers.values())
    assert row["weights"] == row["copied"] == weights > 0
    assert 0 < flipped < weights and row["flipped"] == pytest.approx(flipped / weights)
    assert row["near_zero"] == pytest.approx(near / weights)
    ratios = np.concatenate([np.abs(alpha) / _mean_abs(w) for w, alpha in layers.values()])
    assert row["alpha_over_mean_abs"] == pytest.approx(np.percentile(ratios, [1, 50, 99]).tolist())
    assert f"| {run_dir} | {weights:,} | {weights:,} |" in capsys.readouterr().out

    # Without a start and without alpha: nothing to compare, no scale; the weights still counted.
    config.init_from, config.model.binary.scale = "", "none"
    plain_dir = tmp_path / "plain"
    smoke.save_run(plain_dir, config, [1], num_classes=num_classes)
    [plain] = script.main([str(plain_dir)])
    assert plain["weights"] == weights and plain["copied"] == 0
    assert plain["flipped"] is None and plain["alpha_over_mean_abs"] is None

    real = smoke.smoke_config("real")
    smoke.save_run(tmp_path / "real", real, [1], num_classes=num_classes)
    with pytest.raises(ValueError, match="no 1-bit kernels"):
        script.main([str(tmp_path / "real")])
