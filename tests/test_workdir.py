"""No work is lost nor silently replaced: a workdir of another config is an error that leaves it
as it was, eval never scores a model it could not restore, what evaluation needs is checked
before the first step, every evaluation comes after a save, a damaged checkpoint is moved aside
so that the steps trained again are saved, and a SIGTERM always ends with a checkpoint."""

import json
import os
import pathlib
import signal

import jax
import pytest
import smoke

from dfrdet_jax import (
    checkpointing,
    data,
    evaluate,
    evaluation,
    main,
    run_utils,
    sharding,
    steps,
    train,
)
from dfrdet_jax.models import registry


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The smoke configs' synthetic data, generated once for the module."""
    return str(tmp_path_factory.mktemp("data"))


def _config(root, variant="real", **train_fields):
    config = smoke.smoke_config(variant)
    config.data.root = root
    config.train.update(train_fields)
    return config


def _save_run(workdir, config, steps_saved):
    return smoke.save_run(workdir, config, steps_saved)


def _files(workdir):
    return sorted(str(p.relative_to(workdir)) for p in pathlib.Path(workdir).rglob("*"))


def _damage(workdir, step):
    for path in pathlib.Path(workdir, "checkpoints", str(step), "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")


def test_a_workdir_of_another_config_is_an_error_that_changes_nothing(data_root, tmp_path):
    workdir = tmp_path / "bnn_run"
    _save_run(workdir, _config(data_root, "bnn"), [2, 4])
    before = _files(workdir)
    other = _config(data_root, "real")
    for mode in ("train", "eval", "export"):
        with pytest.raises(
            checkpointing.WorkdirMismatchError, match=r"variant: 'bnn' there, 'real' now"
        ):
            main.run(mode, other, str(workdir))
    assert _files(workdir) == before
    # A workdir from before config.json: the stored tensors tell.
    os.remove(workdir / checkpointing.RUN_CONFIG)
    with pytest.raises(
        checkpointing.WorkdirMismatchError,
        match=r"Checkpoint 4 .* holds another model or optimizer than this config \(fcos real on "
        r"synthetic\) builds \(.*written by a run that stored no config.json",
    ):
        main.run("train", other, str(workdir))
    assert _files(workdir) == [f for f in before if f != checkpointing.RUN_CONFIG]


def test_eval_and_export_never_use_a_model_they_could_not_restore(data_root, tmp_path):
    config = _config(data_root, "real")
    workdir = tmp_path / "run"
    _save_run(workdir, config, [3])
    _damage(workdir, 3)
    for mode in ("eval", "export"):
        with pytest.raises(FileNotFoundError, match=r"No readable latest checkpoint in .*run"):
            main.run(mode, config, str(workdir))
    assert (workdir / "checkpoints" / "3").is_dir()  # reading moves nothing
    assert not list(workdir.glob("eval_*.json")) and not (workdir / "export").exists()
    with pytest.raises(FileNotFoundError, match=r"No readable latest checkpoint"):
        main.run("eval", config, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, r"config.eval.batch_size=0 must be at least 1"),
        ("split", "holdout", r"synthetic data has splits .* not 'holdout'"),
        ("protocol", "coco", r"Unknown protocol 'coco'"),
        # DOTA's default best metric with the paper's protocol, which reports no mAP50.
        ("protocol", "dota_aitod", r"best_metric='mAP50' is not a metric of .*'dota_aitod'"),
    ],
)
def test_what_evaluation_needs_is_checked_before_training(
    data_root, tmp_path, field, value, message
):
    config = _config(data_root)
    config.eval[field] = value
    if field == "protocol":
        config.eval.best_metric = "mAP50"
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("log_every_steps", 0, r"config.train.log_every_steps must be at least 1"),
        ("checkpoint_every_steps", -1, r"config.train.checkpoint_every_steps must be at least"),
        ("num_steps", 0, r"config.train.num_steps or config.train.num_epochs must be positive"),
        ("spike_factor", -1.0, r"config.train.spike_factor must be 0 \(off\) or more"),
    ],
)
def test_a_schedule_that_cannot_run_is_named_before_training(
    data_root, tmp_path, field, value, message
):
    config = _config(data_root)
    config.train[field] = value
    config.train.num_epochs = 0
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_changed_training_data_is_named_on_resume(data_root, tmp_path):
    workdir = tmp_path / "run"
    config = _config(data_root)
    _save_run(workdir, config, [2])
    dataset = data.build_dataset(config.data, "train", train=True, batch_size=2, seed=0)
    iterator = iter(dataset.loader)
    next(iterator)
    model = registry.build_model(config, num_classes=8)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 12)
    checkpoints = checkpointing.Checkpointer(str(workdir))
    checkpoints.save(3, state.replace(step=3), dataset.get_iterator_state(iterator))
    checkpoints.wait()
    config.data.synthetic.num_train += 4  # more training images than the run was saved with
    with pytest.raises(data.DataError, match=r"training data changed since checkpoint 3") as e:
        train.train_and_evaluate(config, str(workdir))
    assert f"--config.init_from={workdir}" in str(e.value)


@pytest.mark.parametrize("lenient", [False, True])
def test_a_bad_val_annotation_fails_before_training(tmp_path, lenient):
    # Lenient loading skips it, but the evaluator would stop at it after the first epoch.
    config = _config(str(tmp_path / "data"))
    config.data.lenient = lenient
    val_json = data.load_records(config.data, "val").annotation_file
    with open(val_json) as f:
        gt = json.load(f)
    gt["annotations"].append({**gt["annotations"][0], "id": 10**6, "category_id": 99})
    with open(val_json, "w") as f:
        json.dump(gt, f)
    error = evaluation.EvaluationInputError if lenient else data.DataError
    with pytest.raises(error, match=r"val.json: annotation"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_is_moved_aside_and_evaluation_comes_after_a_save(
    data_root, tmp_path, monkeypatch, capsys
):
    config = _config(data_root, num_steps=3, checkpoint_every_steps=100, eval_every_steps=2)
    workdir = tmp_path / "run"
    _save_run(workdir, config, [1, 2])
    _damage(workdir, 2)

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(evaluate, "evaluate_state", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.train_and_evaluate(config, str(workdir))
    damaged = workdir / checkpointing.DAMAGED_DIR / "2"
    assert damaged.is_dir() and f"moved to {damaged}" in capsys.readouterr().out
    # Step 2 trained again from step 1 is saved (orbax writes no step at or below the latest on
    # disk: the damaged one had to go) and is saved before the evaluation that failed.
    assert checkpointing.Checkpointer(str(workdir)).manager.all_steps() == [1, 2]
    model = registry.build_model(config, num_classes=8)
    replicated = sharding.replicated_sharding(sharding.make_mesh())
    template = steps.abstract_train_state(config, model, (64, 64), 3, replicated)
    state, data_state = checkpointing.Checkpointer(str(workdir)).restore(template)
    assert int(state.step) == 2 and data_state is not None


@pytest.mark.slow
def test_sigterm_while_logging_still_saves(data_root, tmp_path, monkeypatch, caplog):
    # Step 1 is logged but not saved: the signal comes after the step's stop check.
    config = _config(data_root, num_steps=3, log_every_steps=1, checkpoint_every_steps=100)
    write = run_utils.MetricsWriter.write

    def write_then_sigterm(self, step, metrics, prefix=""):
        write(self, step, metrics, prefix)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_utils.MetricsWriter, "write", write_then_sigterm)
    with caplog.at_level("WARNING"):
        state, _ = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 1
    assert checkpointing.Checkpointer(str(tmp_path)).manager.all_steps() == [1]
    assert any(
        "Stopped at step 1 on SIGTERM; checkpoint 1 is saved" in r.getMessage()
        for r in caplog.records
    )
