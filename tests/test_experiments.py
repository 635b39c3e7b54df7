"""The comparison grid: its runs and commands, resuming from finished runs, and the summary
(mean, sample standard deviation, differences with their standard errors) worked by hand."""

import fcntl
import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from dfrdet_jax import experiments
from dfrdet_jax.models import registry


def _metrics(ap):
    return {m: ap for m in experiments.TABLE_METRICS}


def _finished(workdir, ap):
    """Fakes a finished run in ``workdir``: the test metrics (every one ``ap``) that the eval
    mode writes; returns the workdir."""
    workdir.mkdir(parents=True)
    (workdir / "eval_test_best_1200.json").write_text(json.dumps(_metrics(ap)))
    return workdir


def test_grid_starts_first_and_rows_start_from_them():
    runs = experiments.grid("fcos")
    names = [r.name for r in runs]
    assert names[:2] == ["start_real", "start_topology"] and all(r.shared for r in runs[:2])
    by_name = {r.name: r for r in runs}
    assert by_name["real"].init_from == "start_real"
    assert by_name["bnn"].init_from == by_name["dfr"].init_from == "start_topology"
    assert by_name["bnn_scratch"].init_from is None
    with pytest.raises(ValueError, match="Unknown detector 'yolo'"):
        experiments.grid("yolo")
    with pytest.raises(ValueError, match="Unknown grid 'big'"):
        experiments.grid("fcos", "big")
    with pytest.raises(ValueError, match=r"has no rows \['bnn_fast'\]"):
        experiments.grid("fcos", "recipes", ["bnn_fast"])


def test_every_run_comes_after_the_runs_it_needs():
    for detector in experiments.DETECTORS:
        for name in experiments.GRIDS:
            runs = experiments.grid(detector, name)
            by_name = {r.name: r for r in runs}
            seen = set()
            for run in runs:
                assert set(run.needs) <= seen, (detector, name, run.name)
                assert all(by_name[n].shared for n in run.needs)  # starts and teachers: shared
                assert run.baseline is None or run.baseline in {r.name for r in runs}
                seen.add(run.name)
    # A subset brings exactly what it needs, in order.
    runs = experiments.grid("fcos", "recipes", ["dfr_twostep", "bnn_distill"])
    assert [r.name for r in runs] == [
        "start_binact",
        "dfr_twostep",
        "start_topology",
        "start_real",
        "bnn_distill",
    ]
    by_name = {r.name: r for r in experiments.grid("faster_rcnn", "recipes")}
    assert by_name["bnn_distill"].teacher == "start_real"
    assert not any("logit_weight" in flag for flag in by_name["bnn_distill"].overrides)
    assert by_name["start_binact"].overrides == experiments.BINARY_ACTIVATIONS
    assert by_name["start_binact"].init_from is None and by_name["start_binact"].shared


def test_commands_and_resume(tmp_path, capsys):
    root = str(tmp_path)
    # Finished runs are read, not run again: fake the test metrics of two of them.
    for run, seed, ap in (("start_real", 0, 0.4), ("bnn", 1, 0.2)):
        _finished(tmp_path / run / f"seed{seed}", ap)
    results = experiments.run_grid("fcos", root, [0, 1], ["--config.train.num_steps=5"], True)
    assert results == {"start_real": {0: _metrics(0.4)}, "bnn": {1: _metrics(0.2)}}
    commands = capsys.readouterr().out.splitlines()
    assert not any(f"--workdir={root}/start_real/" in c for c in commands)  # done: not rerun
    train = [c for c in commands if "/bnn/seed0" in c and "--mode=train" in c]
    assert len(train) == 1 and "--config.seed=0" in train[0]
    assert f"--config.init_from={root}/start_topology/seed0" in train[0]
    assert "--config.init_from_checkpoint=best" in train[0]
    assert "--config.train.num_steps=5" in train[0] and "fcos_r18.py:synthetic,bnn,demo" in train[0]
    test = [c for c in commands if "/bnn/seed0" in c and "--mode=eval" in c]
    assert "--config.eval.split=test" in test[0] and "--config.eval.checkpoint=best" in test[0]
    topology = [c for c in commands if "/start_topology/seed0" in c and "--mode=train" in c]
    assert "--config.model.binary.weight_quantizer=none" in topology[0]
    assert not any("/start_topology/seed1" in c for c in commands)  # starts: seed 0 only
    assert not any("distill" in c for c in commands)

    runs = experiments.grid("fcos", "recipes", ["dfr_distill"])
    experiments.run_grid("fcos", root, [1], [], True, runs=runs)
    commands = capsys.readouterr().out.splitlines()
    train = [c for c in commands if "/dfr_distill/seed1" in c and "--mode=train" in c]
    assert f"--config.distill.teacher={root}/start_real/seed0" in train[0]
    assert "--config.distill.feature_weight=1.0" in train[0]
    test = [c for c in commands if "/dfr_distill/seed1" in c and "--mode=eval" in c]
    assert "--config.distill.teacher" not in test[0]  # scoring needs no teacher


def test_rows_at_another_budget_read_the_starts_of_another_root(tmp_path, capsys):
    starts, root = tmp_path / "demo", str(tmp_path / "long")
    runs = experiments.grid("fcos", "recipes", ["bnn_distill"])  # start_topology and start_real
    with pytest.raises(FileNotFoundError, match=f"start_topology: {starts}/start_topology/seed0"):
        experiments.run_grid("fcos", root, [1], [], True, runs=runs, starts_root=str(starts))
    for run, ap in (("start_topology", 0.3), ("start_real", 0.4)):
        _finished(starts / run / "seed0", ap)
    capsys.readouterr()
    budget = ["--config.train.num_steps=4800"]
    results = experiments.run_grid(
        "fcos", root, [1], budget, True, runs=runs, starts_root=str(starts)
    )
    assert results == {"start_topology": {0: _metrics(0.3)}, "start_real": {0: _metrics(0.4)}}
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all(f"--workdir={root}/bnn_distill/seed1" in c for c in commands)
    assert f"--config.init_from={starts}/start_topology/seed0" in commands[0]
    assert f"--config.distill.teacher={starts}/start_real/seed0" in commands[0]
    assert "--config.train.num_steps=4800" in commands[0]
    assert not (tmp_path / "long" / "start_topology").exists()  # nothing trained under root


def test_a_run_another_command_is_running_is_waited_for_not_run_twice(
    tmp_path, capsys, monkeypatch
):
    """Two grid commands on one root: the second waits on the shared start the first is
    training, then reads it; the lock is let go when a run fails."""
    start = tmp_path / "start_topology" / "seed0"
    start.mkdir(parents=True)
    # The first command: holds the start's lock, finishes the start, exits.
    first_command = "\n".join(
        [
            "import fcntl, json, time",
            f"lock = open({str(start / experiments.LOCK_FILE)!r}, 'w')",
            "fcntl.flock(lock, fcntl.LOCK_EX)",
            "print('locked', flush=True)",
            "time.sleep(1.0)",
            f"metrics = {json.dumps(_metrics(0.3))!r}",
            f"open({str(start / 'eval_test_best_1200.json')!r}, 'w').write(metrics)",
        ]
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", first_command], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "locked\n"
    ran = []

    def run_logged(command, log_path, dry_run):
        ran.append(command)
        raise RuntimeError("the run failed")

    monkeypatch.setattr(experiments, "_run_logged", run_logged)
    runs = experiments.grid("fcos", "comparison", ["bnn"])  # start_topology, then bnn
    with pytest.raises(RuntimeError, match="the run failed"):
        experiments.run_grid("fcos", str(tmp_path), [0], [], runs=runs)
    assert holder.wait() == 0
    assert f"waiting: another command is running {start}" in capsys.readouterr().out
    assert len(ran) == 1 and f"--workdir={tmp_path}/bnn/seed0" in ran[0]  # the start: not rerun
    with open(tmp_path / "bnn" / "seed0" / experiments.LOCK_FILE) as lock:  # let go on failure
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_main_writes_a_command_that_a_shell_runs_as_given(tmp_path, capsys):
    """The recorded grid command and each printed run command keep ``--budget``'s quoting."""
    root = tmp_path / "runs"
    for run, ap in (("start_topology", 0.3), ("bnn", 0.2)):
        _finished(root / run / "seed0", ap)
    budget = "--budget=--config.model.binary_parts=('backbone','head') --config.seed=3"
    argv = ["--detector", "fcos", "--root", str(root), "--rows", "bnn,dfr", "--seeds", "0"]
    experiments.main([*argv, budget, "--dry_run"])
    recorded = json.loads((root / "results.json").read_text())["command"]
    assert shlex.split(recorded) == ["python", "-m", "dfrdet_jax.experiments", *argv, budget]
    printed = [c for c in capsys.readouterr().out.splitlines() if "--mode=train" in c]
    assert len(printed) == 1 and "/dfr/seed0" in printed[0]  # bnn is done; dfr is not
    assert "--config.model.binary_parts=('backbone','head')" in shlex.split(printed[0])


def test_the_validation_ap_that_selected_each_run_is_tabulated(tmp_path):
    """Each run's best validation AP (what its checkpoint and any setting of its row are chosen
    on) comes from its metrics.jsonl into the results and the table, beside the test metrics."""
    root = tmp_path / "runs"
    logged = {  # seed -> the validation APs its evaluations logged (step 600, step 1200)
        0: [0.40, 0.46],
        1: [0.44, 0.42],
    }
    _finished(root / "start_topology" / "seed0", 0.3)
    for seed, values in logged.items():
        workdir = _finished(root / "bnn" / f"seed{seed}", 0.2)
        lines = [{"step": 50, "train/loss": 1.0}]
        lines += [{"step": 600 * (i + 1), "eval/AP": v} for i, v in enumerate(values)]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        best = 600 * (1 + values.index(max(values)))  # the step that the test metrics score
        (workdir / "eval_test_best_1200.json").rename(workdir / f"eval_test_best_{best}.json")
    runs = experiments.grid("fcos", "comparison", ["bnn"])
    results = experiments.run_grid("fcos", str(root), [0, 1], [], True, runs=runs)
    assert [results["bnn"][s][experiments.VALIDATION_AP] for s in (0, 1)] == [0.46, 0.44]
    assert experiments.VALIDATION_AP not in results["start_topology"][0]  # none logged
    summary = experiments.summarize(results)
    assert summary["bnn"][experiments.VALIDATION_AP]["mean"] == pytest.approx(45.0)
    assert experiments.VALIDATION_AP not in summary["start_topology"]
    table = experiments.markdown_table("fcos", summary, "CMD", runs)
    assert "| AP_m | validation AP |" in table
    assert "| fcos bnn | 2 | 20.0 ± 0.0 |" in table and "| 45.0 ± 1.4 |" in table
    assert "| fcos start_topology | 1 |" in table and table.count(" - |") == 1


def test_the_validation_ap_is_the_best_checkpoints_not_the_largest(tmp_path):
    """A run that selects by another metric (TinyPerson's AP50_tiny) has its best checkpoint
    where that metric peaked: the validation AP is the one logged at that checkpoint's step
    (named by its test metrics' file), not the largest logged."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    lines = [
        {"step": 600, "eval/AP": 0.50, "eval/AP50_tiny": 0.30},
        {"step": 1200, "train/loss": 0.9},
        {"step": 1200, "eval/AP": 0.45, "eval/AP50_tiny": 0.35},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert experiments.validation_ap(str(workdir)) is None  # not tested yet
    (workdir / "eval_test_best_1200.json").write_text(json.dumps(_metrics(0.4)))
    assert experiments.validation_ap(str(workdir)) == 0.45


def test_summary_and_table_by_hand(tmp_path):
    results = {
        "real": {0: _metrics(0.50), 1: _metrics(0.52), 2: _metrics(0.54)},
        "bnn": {0: _metrics(0.20), 1: _metrics(0.22)},
        "dfr": {0: _metrics(0.25), 1: _metrics(0.27)},
    }
    summary = experiments.summarize(results)
    assert summary["real"]["AP"]["mean"] == pytest.approx(52.0)
    assert summary["real"]["AP"]["std"] == pytest.approx(2.0)  # sample std of 50, 52, 54
    assert summary["bnn"]["AP"]["values"] == pytest.approx([20.0, 22.0])
    runs = experiments.grid("fcos")
    table = experiments.markdown_table("fcos", summary, "CMD", runs)
    assert "| fcos real | 3 | 52.0 ± 2.0 |" in table
    assert "- bnn keeps 40 % of the real AP." in table
    # An lr row of the real variant is the reference when it is the table's only real row.
    lr_runs = experiments.grid("fcos", "recipes", ["real_lr32x", "bnn_lr16x"])
    lr_summary = experiments.summarize({"real_lr32x": results["real"], "bnn_lr16x": results["bnn"]})
    lr_table = experiments.markdown_table("fcos", lr_summary, "CMD", lr_runs)
    assert "- bnn_lr16x keeps 40 % of the real_lr32x AP." in lr_table
    two_real = experiments.grid("fcos", "recipes", ["real", "real_lr32x", "bnn"])
    two_summary = experiments.summarize({**results, "real_lr32x": results["real"]})
    assert "keeps" not in experiments.markdown_table("fcos", two_summary, "CMD", two_real)
    se = math.sqrt(2 * 2.0 / 2)  # both rows: std sqrt(2), two seeds
    # Both seeds gain exactly 5.0: paired by seed, no spread left.
    paired = "paired by seed over 2: +5.0, standard error 0.00"
    assert f"- dfr - bnn, AP: +5.0 (standard error {se:.1f}; {paired})" in table
    one_seed = experiments.summarize({"bnn": results["bnn"], "dfr": {0: _metrics(0.25)}})
    assert "- dfr - bnn, AP: +4.0 (one seed: no standard error)" in experiments.markdown_table(
        "fcos", one_seed, "CMD", runs
    )
    assert "collapsed" not in table and "diverged" not in table
    # A seed far below its row's others is flagged (the mean still includes it).
    collapsed = {**results, "dfr": {0: _metrics(0.45), 1: _metrics(0.44), 2: _metrics(0.17)}}
    flagged = experiments.markdown_table("fcos", experiments.summarize(collapsed), "CMD", runs)
    assert "| fcos dfr | 3 | 35.3 ± 15.9 |" in flagged
    assert "- **dfr, seed 2: AP 17.0, under 50% of the row's median 44.0**" in flagged
    assert flagged.count("diverged") == 1  # real's 50, 52, 54 are not flagged
    experiments.write_outputs("fcos", str(tmp_path), results, command="CMD", runs=runs)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == "CMD" and saved["summary"]["dfr"]["AP"]["n"] == 2
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text() == table


def test_paired_differences_and_the_control_row_by_hand():
    """DFR against bnn and against its blank-image control, paired over the seeds both rows
    have: the differences 5, 4, 6 (seed 3 of dfr has no control) have mean 5 and standard
    error 1 / sqrt(3)."""
    results = {
        "bnn_lr16x": {0: _metrics(0.20), 1: _metrics(0.22), 2: _metrics(0.21)},
        "dfr_lr16x": {s: _metrics(ap) for s, ap in enumerate((0.25, 0.26, 0.27, 0.40))},
        "dfr_zero_lr16x": {0: _metrics(0.20), 1: _metrics(0.22), 2: _metrics(0.21)},
    }
    summary = experiments.summarize(results)
    mean, se, common = experiments.paired_difference(summary, "dfr_lr16x", "dfr_zero_lr16x")
    assert (mean, common) == (pytest.approx(5.0), 3) and se == pytest.approx(1 / math.sqrt(3))
    assert experiments.paired_difference(summary, "bnn_lr16x", "dfr_zero_lr16x", "AP_t")[:2] == (
        pytest.approx(0.0),
        pytest.approx(0.0),
    )
    runs = experiments.grid("fcos", "ablation", ["bnn_lr16x", "dfr_lr16x", "dfr_zero_lr16x"])
    by_name = {r.name: r for r in runs}
    assert by_name["dfr_lr16x"].control == "dfr_zero_lr16x"  # scaled with the row
    assert by_name["dfr_zero_lr16x"].control is None
    table = experiments.markdown_table("fcos", summary, "CMD", runs)
    unpaired = math.sqrt(np.var([25, 26, 27, 40], ddof=1) / 4 + np.var([20, 22, 21], ddof=1) / 3)
    assert (
        f"- dfr_lr16x - dfr_zero_lr16x, AP_vt: +8.5 (standard error {unpaired:.1f}; "
        "paired by seed over 3: +5.0, standard error 0.58)"
    ) in table
    assert "- dfr_zero_lr16x - bnn_lr16x, AP: +0.0" in table
    # Without its control in the table, the row is compared with its baseline alone.
    alone = experiments.summarize({k: results[k] for k in ("bnn_lr16x", "dfr_lr16x")})
    assert "dfr_zero" not in experiments.markdown_table("fcos", alone, "CMD", runs)


def test_any_row_at_a_scaled_learning_rate():
    demo_lr = experiments._demo_learning_rate("fcos")  # pylint: disable=protected-access
    runs = experiments.grid("fcos", "ablation", ["dfr_lambda_1_lr16x", "bnn_lr2x"])
    by_name = {r.name: r for r in runs}
    assert [r.name for r in runs] == ["start_topology", "dfr_lambda_1_lr16x", "bnn_lr2x"]
    lambda_1 = by_name["dfr_lambda_1_lr16x"]
    assert lambda_1.overrides == (
        "--config.loss.dfr_weight=1.0",
        f"{experiments.LR_FLAG}={16 * demo_lr}",
    )
    assert lambda_1.init_from == "start_topology" and lambda_1.variant == "dfr"
    assert lambda_1.baseline == "bnn_lr16x"  # its baseline at the same factor
    assert by_name["bnn_lr2x"].baseline == "bnn"  # no baseline: itself at the budget's lr
    twostep = experiments.grid("fcos", "recipes", ["dfr_twostep_lr8x"])[-1]
    assert twostep.init_from == "start_binact" and twostep.baseline == "bnn_twostep_lr8x"
    assert "--config.optimizer.latent_weight_decay=False" in twostep.overrides
    with pytest.raises(ValueError, match="starts train once"):
        experiments.grid("fcos", "recipes", ["start_binact_lr2x"])
    with pytest.raises(ValueError, match=r"has no rows \['bnn_lr0x', 'nothing_lr2x'\]"):
        experiments.grid("fcos", "recipes", ["bnn_lr0x", "nothing_lr2x"])


def test_decoder_rows_keep_the_decoder_at_the_budgets_learning_rate():
    demo_lr = experiments._demo_learning_rate("fcos")  # pylint: disable=protected-access
    run = experiments.grid("fcos", "recipes", ["dfr_real_fpn_decoder_1x_lr16x"])[-1]
    assert run.overrides == (
        "--config.model.binary_parts=('backbone','head')",
        f"--config.dfr.base_learning_rate={demo_lr}",
        f"{experiments.LR_FLAG}={16 * demo_lr}",
    )
    assert run.variant == "dfr" and run.init_from == "start_topology"
    assert run.baseline == "bnn_real_fpn_lr16x"
    plain = experiments.grid("fcos", "recipes", ["dfr_decoder_1x"])[-1]
    assert plain.baseline == "bnn" and plain.overrides == (
        f"--config.dfr.base_learning_rate={demo_lr}",
    )


def test_every_control_differs_from_its_row_by_the_blank_image_alone():
    """A DFR row and its control share start, baseline and every flag but ``dfr.mode=zero``, so
    their difference measures Eq. 10's foreground alone."""
    controlled = 0
    for name in experiments.GRIDS:
        by_name = {r.name: r for r in experiments.grid("fcos", name)}
        for run in by_name.values():
            if run.control is None:
                continue
            control = by_name[run.control]
            assert control.overrides == (*run.overrides, "--config.dfr.mode=zero"), run.name
            assert (control.variant, control.init_from, control.baseline) == (
                run.variant,
                run.init_from,
                run.baseline,
            )
            controlled += 1
    assert controlled >= 3  # dfr (ablation), dfr_decoder_1x_{scale_none,no_reconstruction}


@pytest.mark.parametrize("detector", experiments.DETECTORS)
def test_every_row_parses_to_a_valid_config(detector):
    """Each row's train command, parsed as ``main`` parses it, gives a config that the model
    registry accepts, only starts are shared and each baseline is a row: a flag typo, an unknown
    mode or a misplaced field in a row fails here, not hours into a grid."""
    for name in experiments.GRIDS:
        runs = experiments.grid(detector, name)
        for run in runs:
            assert run.shared == run.name.startswith("start_"), run.name  # only starts are shared
            assert run.baseline in {None} | {r.name for r in runs}, run.name
            command = experiments._main_command(  # pylint: disable=protected-access
                detector, run, seed=1, root="/runs", budget=(), mode="train"
            )
            argv = ["main", *(arg for arg in command if arg.startswith("--config"))]
            flag_values = flags.FlagValues()
            # The override flags are defined from the argv given here, as main's from sys.argv.
            config_flags.DEFINE_config_file(
                "config", lock_config=True, flag_values=flag_values, sys_argv=argv
            )
            flag_values(argv)
            config = flag_values.config
            registry.validate_config(config)
            assert config.seed == (0 if run.shared else 1), run.name
