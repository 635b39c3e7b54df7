"""Checkpoints: round trip with the iterator state, corrupt latest falls back, best by metric."""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import optax

from dfrdet_jax import checkpointing
from dfrdet_jax.steps import TrainState


def _state(value):
    params = {"dense": {"kernel": jnp.full((3, 2), value), "bias": jnp.zeros(2)}}
    state = TrainState.create(
        apply_fn=None,
        params=params,
        batch_stats={"bn": {"mean": jnp.ones(2) * value}},
        tx=optax.sgd(0.1, momentum=0.9),
    )
    return state.replace(step=jnp.asarray(int(value), jnp.int32))


def test_round_trip_with_iterator_state(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"position": step * 10})
    ckpt.wait()
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [2, 3]
    restored, data_state = checkpointing.Checkpointer(str(tmp_path)).restore(_state(0))
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((3, 2), 3.0))
    np.testing.assert_array_equal(restored.batch_stats["bn"]["mean"], np.full(2, 3.0))
    assert data_state == {"position": 30}


def test_no_checkpoint_returns_the_given_state(tmp_path):
    fresh = _state(5)
    restored, data_state = checkpointing.Checkpointer(str(tmp_path)).restore(fresh)
    assert restored is fresh and data_state is None


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, _state(1), {"position": 10})
    ckpt.save(2, _state(2), {"position": 20})
    ckpt.wait()
    # Damage every file of step 2's state item.
    for path in pathlib.Path(tmp_path, "checkpoints", "2", "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    with caplog.at_level("ERROR"):
        restored, data_state = checkpointing.Checkpointer(str(tmp_path)).restore(_state(0))
    assert int(restored.step) == 1 and data_state == {"position": 10}
    assert any(
        "Checkpoint 2" in r.getMessage() and "cannot be restored" in r.getMessage()
        for r in caplog.records
    )


def test_best_checkpoint_keeps_the_highest_metric(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    for step, ap in ((1, 0.2), (2, 0.5), (3, 0.3), (4, None), (5, -1.0)):
        ckpt.save_best(step, _state(step), ap)
    ckpt.wait()
    kept = [p.name for p in (tmp_path / "checkpoints_best").iterdir() if p.name.isdigit()]
    assert kept == ["2"]
    assert not os.path.exists(tmp_path / "checkpoints" / "2")
