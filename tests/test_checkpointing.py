"""Checkpoints: round trip with the iterator state, a damaged latest falls back (and is moved
aside when training), a checkpoint or config.json of another config is an error, best by
metric."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfrdet_jax import checkpointing, sharding, steps
from dfrdet_jax.models import registry
from dfrdet_jax.steps import TrainState


def _state(value, width=2):
    params = {"dense": {"kernel": jnp.full((3, width), value), "bias": jnp.zeros(width)}}
    state = TrainState.create(
        apply_fn=None,
        params=params,
        batch_stats={"bn": {"mean": jnp.ones(2) * value}},
        tx=optax.sgd(0.1, momentum=0.9),
    )
    return state.replace(step=jnp.asarray(int(value), jnp.int32))


def _steps(directory):
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _damage(workdir, step):
    """Overwrites every file of checkpoint ``step``'s state item."""
    for path in pathlib.Path(workdir, "checkpoints", str(step), "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")


def test_round_trip_with_iterator_state(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"position": step * 10})
    ckpt.wait()
    assert _steps(tmp_path / "checkpoints") == [2, 3]
    restored, data_state = checkpointing.Checkpointer(str(tmp_path)).restore(_state(0))
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((3, 2), 3.0))
    np.testing.assert_array_equal(restored.batch_stats["bn"]["mean"], np.full(2, 3.0))
    assert data_state == {"position": 30}


def test_no_checkpoint_restores_nothing_and_read_only_creates_nothing(tmp_path):
    assert (
        checkpointing.Checkpointer(str(tmp_path / "run"), read_only=True).restore(_state(5)) is None
    )
    assert not (tmp_path / "run").exists()
    assert checkpointing.Checkpointer(str(tmp_path)).restore(_state(5)) is None


def test_a_detector_restores_into_its_abstract_state(tmp_path, smoke_config):
    # What evaluation, prediction and export restore into: shapes and shardings, no values.
    config = smoke_config("bnn")
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(1), (64, 64), 10)
    replicated = sharding.replicated_sharding(sharding.make_mesh())
    abstract = steps.abstract_train_state(config, model, (64, 64), 10, replicated)
    for field in ("step", "params", "batch_stats", "opt_state"):
        got, want = getattr(abstract, field), getattr(state, field)
        assert jax.tree.structure(got) == jax.tree.structure(want), field
        for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert isinstance(a, jax.ShapeDtypeStruct) and a.sharding == replicated
            assert (a.shape, a.dtype) == (s.shape, s.dtype), field
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(7, state.replace(step=jnp.asarray(7, jnp.int32)), None)
    ckpt.wait()
    restored, _ = checkpointing.Checkpointer(str(tmp_path), read_only=True).restore(abstract)
    assert int(restored.step) == 7
    pairs = zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True)
    for r, s in pairs:
        assert r.sharding == replicated
        np.testing.assert_array_equal(r, s)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)


def test_damaged_latest_is_moved_aside_and_its_step_saved_again(tmp_path, caplog, capsys):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, _state(1), {"position": 10})
    ckpt.save(2, _state(2), {"position": 20})
    ckpt.wait()
    _damage(tmp_path, 2)
    # Reading only (eval): the previous one, and the damaged one stays where it is.
    with caplog.at_level("ERROR"):
        restored, data_state = checkpointing.Checkpointer(str(tmp_path), read_only=True).restore(
            _state(0)
        )
    assert int(restored.step) == 1 and data_state == {"position": 10}
    assert any(
        "Checkpoint 2" in r.getMessage() and "cannot be restored" in r.getMessage()
        for r in caplog.records
    )
    assert _steps(tmp_path / "checkpoints") == [1, 2]
    # Training: moved aside, said on stdout, so that step 2 trained again is saved and read.
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    restored, _ = ckpt.restore(_state(0))
    assert int(restored.step) == 1
    damaged = tmp_path / checkpointing.DAMAGED_DIR / "2"
    assert damaged.is_dir() and f"moved to {damaged}" in capsys.readouterr().out
    ckpt.save(2, _state(7), {"position": 70})
    ckpt.wait()
    restored, data_state = checkpointing.Checkpointer(str(tmp_path)).restore(_state(0))
    assert int(restored.step) == 7 and data_state == {"position": 70}


def test_a_step_orbax_declines_is_an_error(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(4, _state(4), None)
    with pytest.raises(RuntimeError, match=r"Checkpoint 3 was not written: .* holds step 4"):
        ckpt.save(3, _state(3), None)


def test_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path, smoke_config):
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(1, _state(1), None)
    ckpt.save(2, _state(2), None)
    ckpt.wait()
    checkpointing.write_run_config(str(tmp_path), smoke_config("bnn"))
    with pytest.raises(checkpointing.WorkdirMismatchError) as error:
        checkpointing.Checkpointer(str(tmp_path)).restore(
            _state(0, width=5), config=smoke_config("real")
        )
    message = str(error.value)
    assert (
        "Checkpoint 2" in message
        and "params/dense/kernel: (3, 2) stored, (3, 5) expected" in message
    )
    assert "fcos bnn on synthetic" in message and "(fcos real on synthetic)" in message
    assert _steps(tmp_path / "checkpoints") == [1, 2]  # nothing moved, nothing deleted
    assert not (tmp_path / checkpointing.DAMAGED_DIR).exists()


def test_config_json_of_another_config_is_an_error_naming_the_fields(tmp_path, smoke_config):
    checkpointing.check_run_config(str(tmp_path), smoke_config("bnn"))  # no config.json yet
    checkpointing.write_run_config(str(tmp_path), smoke_config("bnn"))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["variant"] == "bnn"
    resumed = smoke_config("bnn")  # what may change between the starts of one run
    resumed.train.num_steps, resumed.optimizer.base_learning_rate = 100, 0.5
    resumed.data.root, resumed.model.dtype = "/elsewhere", "bfloat16"
    checkpointing.check_run_config(str(tmp_path), resumed)
    other = smoke_config("dfr")
    other.model.backbone_width = 16
    other.fcos.box_activation = "exp"  # the same tensors, read otherwise
    with pytest.raises(checkpointing.WorkdirMismatchError) as error:
        checkpointing.check_run_config(str(tmp_path), other)
    message = str(error.value)
    assert (
        "(fcos bnn on synthetic, see" in message
        and "than this one (fcos dfr on synthetic)" in message
    )
    for field in (
        "variant: 'bnn' there, 'dfr' now",
        "model.backbone_width: 8 there, 16 now",
        "dfr.levels: [] there, [2, 3, 4] now",
        "fcos.box_activation: 'relu' there, 'exp' now",
    ):
        assert field in message
    assert "train.num_steps" not in message
    (tmp_path / "config.json").write_text("{")  # damaged by hand: not silently ignored
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        checkpointing.check_run_config(str(tmp_path), resumed)


def test_best_checkpoint_keeps_the_highest_metric(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    for step, ap in ((1, 0.2), (2, 0.5), (3, 0.3), (4, None), (5, -1.0)):
        ckpt.save_best(step, _state(step), ap)
    ckpt.wait()
    assert _steps(tmp_path / "checkpoints_best") == [2]
    assert not os.path.exists(tmp_path / "checkpoints" / "2")


def test_best_checkpoint_of_a_lower_is_better_metric_keeps_the_lowest(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), best_mode="min")
    for step, olrp in ((1, 0.9), (2, 0.6), (3, 0.8)):
        ckpt.save_best(step, _state(step), olrp)
    ckpt.wait()
    assert _steps(tmp_path / "checkpoints_best") == [2]


def test_a_stored_config_of_an_older_version_gets_todays_defaults(load_config, caplog, tmp_path):
    config = load_config("synthetic,dfr,demo", "retinanet")
    config.model.fpn_width = 24  # a stored value, not a default
    stored = json.loads(config.to_json_best_effort())
    del stored["data"]["verify_images"], stored["viz"]  # options a later version added
    # absl's own logger: its level follows --verbosity, which a test that unparses absl's
    # flags resets to WARNING.
    with caplog.at_level("INFO", logger="absl"):
        restored = checkpointing.config_from_json(stored)
    assert "lacks data.verify_images, viz" in caplog.text
    assert restored.data.verify_images is False and restored.viz == config.viz
    assert restored.model.fpn_width == 24 and restored.dfr.levels == config.dfr.levels
    assert isinstance(restored.dfr.levels, tuple)  # JSON's list back to the config's tuple
    # A hand-written config (no known family) is read as it is.
    assert checkpointing.config_from_json({"model": {"name": "yolo"}, "seed": 1}).to_dict() == {
        "model": {"name": "yolo"},
        "seed": 1,
    }
    with pytest.raises(FileNotFoundError, match="no config.json, so its network cannot be"):
        checkpointing.stored_config(str(tmp_path))
    checkpointing.write_run_config(str(tmp_path), config)
    assert checkpointing.stored_config(str(tmp_path)).model.fpn_width == 24
