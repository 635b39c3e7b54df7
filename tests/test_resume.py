"""Training survives: a run killed with SIGKILL and restarted ends exactly where an uninterrupted
run ends (same losses, same parameters); SIGTERM saves a checkpoint and exits cleanly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dfrdet_jax import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "resume_config.py")
pytestmark = pytest.mark.slow  # whole training runs


def _start(workdir, data_dir):
    # XLA_FLAGS (cheap CPU code generation) comes from conftest.py through the environment.
    env = {**os.environ, "DFRDET_TEST_DATA": str(data_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "dfrdet_jax.main", "--config", CONFIG, "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _wait_for_checkpoint(process, workdir, step):
    path = pathlib.Path(workdir, "checkpoints", str(step))
    deadline = time.time() + 600
    while not path.is_dir():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)


def _train_losses(workdir):
    """{step: loss} from metrics.jsonl; a replayed step keeps its last value."""
    losses = {}
    for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def _final_params(workdir, like_state):
    state, _ = checkpointing.Checkpointer(str(workdir)).restore(like_state)
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(workdir, data_dir))
    return data_dir, workdir


def _state_template():
    from dfrdet_jax import sharding, steps  # pylint: disable=g-import-not-at-top
    from dfrdet_jax.models import registry  # pylint: disable=g-import-not-at-top

    sys.path.insert(0, str(ROOT / "tests"))
    import resume_config  # pylint: disable=g-import-not-at-top

    config = resume_config.get_config()
    model = registry.build_model(config, num_classes=8)
    replicated = sharding.replicated_sharding(sharding.make_mesh())
    return steps.abstract_train_state(config, model, (64, 64), 12, replicated)


def test_sigkill_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    data_dir, reference = uninterrupted
    process = _start(tmp_path, data_dir)
    _wait_for_checkpoint(process, tmp_path, 4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    output = _finish(_start(tmp_path, data_dir))
    assert "Resumed from step" in output

    expected, resumed = _train_losses(reference), _train_losses(tmp_path)
    assert sorted(resumed) == sorted(expected) == list(range(1, 13))
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-6
    )
    template = _state_template()
    a, b = _final_params(reference, template), _final_params(tmp_path, template)
    assert int(a.step) == int(b.step) == 12
    import jax  # pylint: disable=g-import-not-at-top

    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
    data_dir, _ = uninterrupted
    process = _start(tmp_path, data_dir)
    _wait_for_checkpoint(process, tmp_path, 2)
    process.send_signal(signal.SIGTERM)
    output = _finish(process)
    assert "Stopped at step" in output
    steps = checkpointing.Checkpointer(str(tmp_path)).manager.all_steps()
    stopped_at = max(_train_losses(tmp_path))
    assert stopped_at < 12 and max(steps) == stopped_at
