"""benchmarks/loss_gradients.py: the gradient of each loss term per parameter group, checked
against the whole loss's gradient (the terms must add up to it), against where each term can
reach (L_DFR never the head, L_det never the decoder), against numpy norms and cosines worked by
hand, and run on a saved run's workdir."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest
import smoke

from dfrdet_jax import data as data_lib
from dfrdet_jax import steps
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_term_gradients_add_up_and_reach_only_their_parts():
    script = smoke.load_benchmark("loss_gradients")
    config = smoke.smoke_config("dfr")
    config.loss.dfr_weight = 0.5
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 10)
    batches = [smoke.make_batch(seed=s) for s in (0, 1)]
    grads = script.term_gradients(config, model, state.params, state.batch_stats, batches)
    assert set(grads) == {"total", "loss_det", "loss_reconstruction", "loss_dfr"}
    # The whole loss applies gamma and lambda itself: the weighted terms must add up to it.
    summed = jax.tree.map(
        lambda *g: sum(g), grads["loss_det"], grads["loss_reconstruction"], grads["loss_dfr"]
    )
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(grads["total"])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))

    assert norm(grads["loss_dfr"]["head"]) == 0 and norm(grads["loss_det"]["decoder"]) == 0
    assert norm(grads["loss_dfr"]["decoder"]) > 0 and norm(grads["loss_dfr"]["neck"]) > 0
    with pytest.raises(ValueError, match="no batches"):
        script.term_gradients(config, model, state.params, state.batch_stats, [])


def test_table_norms_ratios_and_cosines_by_hand():
    script = smoke.load_benchmark("loss_gradients")
    gradients = {
        "loss_det": {"fpn": {"w": np.array([3.0, 4.0])}, "decoder": {"w": np.zeros(1)}},
        "loss_dfr": {"fpn": {"w": np.array([0.0, -1.0])}, "decoder": {"w": np.ones(1)}},
    }
    gradients["total"] = jax.tree.map(np.add, gradients["loss_det"], gradients["loss_dfr"])
    rows = {(r["group"], r["term"]): r for r in script.gradient_table(gradients)}
    assert rows["fpn", "loss_det"] == {
        "term": "loss_det", "group": "fpn", "norm": 5.0, "ratio_to_det": None,
        "cosine_with_det": None,
    }  # fmt: skip
    assert rows["fpn", "loss_dfr"]["ratio_to_det"] == pytest.approx(0.2)
    assert rows["fpn", "loss_dfr"]["cosine_with_det"] == pytest.approx(-0.8)
    assert rows["fpn", "total"]["norm"] == pytest.approx(math.hypot(3, 3))
    assert rows["fpn", "total"]["cosine_with_det"] == pytest.approx(21 / (5 * math.hypot(3, 3)))
    assert (
        rows["decoder", "loss_dfr"]["norm"] == 1
        and rows["decoder", "loss_dfr"]["ratio_to_det"] is None
    )
    assert "| fpn | lambda * L_DFR | 1 | 0.2 | -0.800 |" in script.markdown(list(rows.values()))


def test_main_reads_a_saved_run(tmp_path, capsys):
    config = smoke.smoke_config("dfr")
    num_classes = data_lib.dataset_info(config.data).num_classes
    workdir, out = tmp_path / "run", tmp_path / "rows.json"
    smoke.save_run(workdir, config, [3], num_classes=num_classes)
    args = [f"--workdir={workdir}", "--checkpoint=latest", "--batches=1", f"--out={out}"]
    rows = smoke.load_benchmark("loss_gradients").main(args)
    assert json.loads(out.read_text()) == rows
    groups = {r["group"] for r in rows}
    assert {"backbone", "neck", "head", "decoder"} <= groups
    assert "step 3), 1 batches of train" in capsys.readouterr().out


def test_every_weighted_term_is_named_with_its_weight(smoke_config):
    script = smoke.load_benchmark("loss_gradients")
    config = smoke_config("dfr")
    config.distill.feature_weight, config.distill.logit_weight = 0.5, 2.0
    metrics = dict.fromkeys(
        ["loss_det", "loss_reconstruction", "loss_dfr", "loss_distill_features",
         "loss_distill_logits", "loss_cls", "num_positive"]
    )  # fmt: skip
    assert script.term_weights(config, metrics) == {
        "loss_det": 1.0,
        "loss_reconstruction": config.loss.reconstruction_weight,
        "loss_dfr": config.loss.dfr_weight,
        "loss_distill_features": 0.5,
        "loss_distill_logits": 2.0,
    }
    with pytest.raises(KeyError, match="loss_distill_attention"):
        script.term_weights(config, {"loss_det": 0, "loss_distill_attention": 0})
