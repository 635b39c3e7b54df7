r"""Grids of runs: detector x variant x start x seed at one budget, scored on a held-out test
split, written as ``results[_<grid>].json``, ``.md`` and ``.png`` under ``--root``.

Usage::

  python -m dfrdet_jax.experiments --detector fcos --root runs/fcos --seeds 0,1,2
  python -m dfrdet_jax.experiments --detector fcos --root runs/fcos --grid recipes --rows lsq4

Every run is ``python -m dfrdet_jax.main`` in its own process and workdir
(``ROOT/<run>/seed<k>``, logs in ``train.log`` / ``test.log`` there): training evaluates on the
validation split and keeps its best checkpoint by validation AP; that checkpoint, and only it,
is then scored once on the test split, which nothing else reads. A run whose test metrics exist is
skipped and a half-trained one resumes from its checkpoints, so an interrupted grid is finished by
running the same command again. Grids share a root: a row two grids hold (``bnn``) runs once.
Commands may share a root at the same time (one per core): a run that one of them is training is
locked, and the others wait for it and read its results rather than train it again.
``--rows`` runs some rows and whatever they need (their start, their teacher).
``--starts_root OTHER`` reads the starts, finished, from another root instead of training them:
rows at another budget (``--budget='--config.train.num_steps=4800'``) from the same starts.

Every grid starts from two shared starts, trained once from scratch with seed 0,
  start_real      the real-valued detector (the benchmark's stand-in for ImageNet weights);
  start_topology  the 1-bit network's topology (its shortcuts, PReLUs and learnable biases) with
                  real weights and activations, i.e. the real network 1-bit training starts from;
then trains its rows, each for the same budget per seed. ``comparison`` (the default):
  real            continues start_real;
  bnn, dfr        1-bit (baseline, + DFR) from start_topology, scales derived from its kernels;
  bnn_scratch, dfr_scratch   the same from scratch, for reference.
``recipes``: ways to train the 1-bit network and which parts to binarize (``_recipes``);
``ablation``: the paper's Table 1 (levels decoded, loss terms, lambda; ``_ablation``).
Any row of a grid at k times the budget's learning rate is the row ``<row>_lr<k>x``, named in
``--rows`` (``--rows bnn_lr16x,dfr_twostep_lr16x``): same start, same steps, same data.

The markdown table gives each row's mean +- sample standard deviation over its seeds, each
row's share of the real row's AP, each row's difference from its baseline (and from its control,
where it has one) with its standard error, unpaired and paired by seed (the rows of a seed
share its start), and flags a seed whose AP is under half its row's median (a run that
diverged).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dfrdet_jax import configs
from dfrdet_jax.choices import check_choice

DETECTORS = ("fcos", "retinanet", "faster_rcnn")
TABLE_METRICS = ("AP", "AP50", "AP75", "AP_vt", "AP_t", "AP_s", "AP_m")
# The best checkpoint's validation AP: what the checkpoint, and any setting of a row, is chosen
# on (the table's other metrics are the test split's).
VALIDATION_AP = "val_AP"
# gamma = 0: no L_R (Eq. 3) in the loss.
NO_RECONSTRUCTION = ("--config.loss.reconstruction_weight=0.0",)
# The 1-bit topology computed in real values: BinaryConv/BinaryDense without quantizers.
REAL_TOPOLOGY = (
    "--config.model.binary.input_quantizer=none",
    "--config.model.binary.weight_quantizer=none",
    *NO_RECONSTRUCTION,
)
# Any row of any grid at k times the demo budget's learning rate is the row ``<row>_lr<k>x``
# (e.g. bnn_lr16x, dfr_twostep_lr16x): it sets this flag and keeps the row's start.
LR_FLAG = "--config.optimizer.base_learning_rate"
SCALED_ROW = re.compile(r"(?P<row>.+)_lr(?P<factor>[1-9][0-9]*)x")
# Held (flock) in a run's workdir while a grid command trains and tests it.
LOCK_FILE = ".experiments.lock"
# A seed whose AP is under this fraction of its row's median is reported as collapsed.
COLLAPSED_FRACTION = 0.5
# ReActNet's first step: binary activations, real weights (no scale, hence no L_R).
BINARY_ACTIVATIONS = ("--config.model.binary.weight_quantizer=none", *NO_RECONSTRUCTION)


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid.

    Attributes:
      name: the workdir name and table row.
      variant: the config's variant ('real', 'bnn', 'dfr', 'lsq4').
      overrides: extra ``--config.*`` flags.
      init_from: the run (its best checkpoint, seed 0) this one starts from; None: scratch.
      shared: trained once (seed 0) as a start, not a row of the table.
      baseline: the row this one is compared with in the table (its difference, per metric).
      teacher: the run (seed 0, best checkpoint) this one distils from; None: no distillation.
      control: a second row of the table to compare this one with: the same design without the
        ingredient under test (DFR against its decoder asked for a blank image).
    """

    name: str
    variant: str
    overrides: tuple[str, ...] = ()
    init_from: str | None = None
    shared: bool = False
    baseline: str | None = None
    teacher: str | None = None
    control: str | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The runs this one reads: its start and its teacher."""
        return tuple(name for name in (self.init_from, self.teacher) if name)


def _starts() -> list[Run]:
    return [
        Run("start_real", "real", shared=True),
        Run("start_topology", "bnn", REAL_TOPOLOGY, shared=True),
    ]


def _comparison(detector: str) -> list[Run]:
    del detector  # the same rows for every family
    return [
        Run("real", "real", init_from="start_real"),
        Run("bnn", "bnn", init_from="start_topology"),
        Run("dfr", "dfr", init_from="start_topology", baseline="bnn"),
        Run("bnn_scratch", "bnn", baseline="bnn"),
        Run("dfr_scratch", "dfr", baseline="bnn_scratch"),
    ]


def _recipes(detector: str) -> list[Run]:
    """How the 1-bit network is trained and which parts are binary, each row against the plain
    ``bnn`` from the same start (the two-step start is trained from scratch, so that it too sees
    two budgets): no weight decay on latent weights, ReActNet's two steps, distillation from
    the real start or from the 1-bit topology's real start (the student's own start), a real
    FPN (the paper's 1-bit sizes fit one), the DFR decoder kept at the budget's learning rate
    (``_decoder_1x``), a real FPN normalised before the 1-bit head (``_head_norm``), only the
    backbone binary (where the accuracy goes), the paper's LSQ 4-bit baseline, the binary
    layers' scale alpha detached (``mean``) or left out with L_R (``none``), L_R alone left out
    (``no_reconstruction``), and 1-bit + DFR without alpha and L_R or without L_R alone, each
    beside its blank-image control."""
    no_latent_decay = ("--config.optimizer.latent_weight_decay=False",)
    distill = ["--config.distill.feature_weight=1.0"]
    if detector != "faster_rcnn":  # its RoI logits cannot be matched (dfrdet_jax/distill.py)
        distill.append("--config.distill.logit_weight=1.0")
    topology, real_fpn = "start_topology", ("--config.model.binary_parts=('backbone','head')",)
    head_norm = (*real_fpn, "--config.model.head_input_norm=True")
    backbone_only = ("--config.model.binary_parts=('backbone',)",)
    no_scale = ("--config.model.binary.scale=none",)
    # The real-valued decoder at the budget's lr whatever the row's (``_lr16x`` scales the rest):
    # at 16x its unnormalised residual block can blow up in one step (RESULTS.md, "A steady decoder").
    decoder_1x = (f"--config.dfr.base_learning_rate={_demo_learning_rate(detector)}",)
    return [
        Run("real", "real", init_from="start_real"),
        Run("bnn", "bnn", init_from=topology),
        Run("dfr", "dfr", init_from=topology, baseline="bnn"),
        Run("bnn_no_latent_wd", "bnn", no_latent_decay, topology, baseline="bnn"),
        Run("start_binact", "bnn", BINARY_ACTIVATIONS, shared=True),
        Run("bnn_twostep", "bnn", no_latent_decay, "start_binact", baseline="bnn"),
        Run("dfr_twostep", "dfr", no_latent_decay, "start_binact", baseline="bnn_twostep"),
        Run("bnn_distill", "bnn", tuple(distill), topology, baseline="bnn", teacher="start_real"),
        Run(
            "dfr_distill",
            "dfr",
            tuple(distill),
            topology,
            baseline="bnn_distill",
            teacher="start_real",
        ),
        # The teacher of the student's own topology (real weights and activations): its FPN
        # maps are the ones the 1-bit network computes, which the standard real FCOS's are not.
        Run(
            "bnn_distill_topology",
            "bnn",
            tuple(distill),
            topology,
            baseline="bnn",
            teacher=topology,
        ),
        Run(
            "dfr_distill_topology",
            "dfr",
            tuple(distill),
            topology,
            baseline="bnn_distill_topology",
            teacher=topology,
        ),
        Run("bnn_real_fpn", "bnn", real_fpn, topology, baseline="bnn"),
        Run("dfr_real_fpn", "dfr", real_fpn, topology, baseline="bnn_real_fpn"),
        Run("dfr_decoder_1x", "dfr", decoder_1x, topology, baseline="bnn"),
        Run(
            "dfr_real_fpn_decoder_1x",
            "dfr",
            (*real_fpn, *decoder_1x),
            topology,
            baseline="bnn_real_fpn",
        ),
        # The real FPN's levels normalised before the 1-bit head, whose first units' binary
        # branches they would drown (RESULTS.md, "A 1-bit head on a real FPN").
        Run("bnn_real_fpn_head_norm", "bnn", head_norm, topology, baseline="bnn_real_fpn"),
        Run(
            "dfr_real_fpn_head_norm_decoder_1x",
            "dfr",
            (*head_norm, *decoder_1x),
            topology,
            baseline="bnn_real_fpn_head_norm",
        ),
        Run("bnn_binary_backbone", "bnn", backbone_only, topology, baseline="bnn"),
        Run("dfr_binary_backbone", "dfr", backbone_only, topology, baseline="bnn_binary_backbone"),
        Run("lsq4", "lsq4", init_from=topology, baseline="bnn"),
        # Each binary conv of FCOS and RetinaNet feeds a per-channel norm (BatchNorm; GroupNorm
        # of 1-2 channels a group at demo widths), which undoes most of alpha, leaving L_R to pull the latent
        # weights to +-alpha (RESULTS.md, "Without L_R"). 'mean': XNOR-Net's detached mean|w|, L_R
        # kept; 'none': no alpha, hence no L_R.
        Run(
            "bnn_scale_mean", "bnn", ("--config.model.binary.scale=mean",), topology, baseline="bnn"
        ),
        Run("bnn_scale_none", "bnn", no_scale, topology, baseline="bnn"),
        # L_R alone off: the learned alpha is then held by nothing but the task's small gradient.
        Run("bnn_no_reconstruction", "bnn", NO_RECONSTRUCTION, topology, baseline="bnn"),
        *_with_blank_image_control(
            Run(
                "dfr_decoder_1x_scale_none",
                "dfr",
                (*no_scale, *decoder_1x),
                topology,
                baseline="bnn_scale_none",
            )
        ),
        # The same pair with the learned alpha kept: Faster R-CNN's 1-bit RoI layers feed
        # GroupNorms of 4 channels a group, whose channels' relative scale alpha sets.
        *_with_blank_image_control(
            Run(
                "dfr_decoder_1x_no_reconstruction",
                "dfr",
                (*NO_RECONSTRUCTION, *decoder_1x),
                topology,
                baseline="bnn_no_reconstruction",
            )
        ),
    ]


def _with_blank_image_control(run: Run) -> tuple[Run, Run]:
    """A DFR row and its control, ``dfr_zero_<rest of its name>``: the same row with the decoder
    asked for a blank image (the ablation grid's ``dfr_zero``), so that their difference is
    Eq. 10's foreground alone."""
    control = dataclasses.replace(
        run,
        name=run.name.replace("dfr_", "dfr_zero_", 1),
        overrides=(*run.overrides, "--config.dfr.mode=zero"),
    )
    return dataclasses.replace(run, control=control.name), control


def _scaled_learning_rate(run: Run, factor: int, detector: str) -> Run:
    """``run`` at ``factor`` times the demo budget's learning rate, named ``<row>_lr<k>x`` and
    compared with its baseline at the same factor (a row without a baseline: with itself at
    the budget's lr). The start stays the row's: starts train once, at the budget's lr."""
    # 1-bit latent weights move the output only when they cross zero; from scratch, twice the
    # demo's lr gave 27.5 AP against 17.7, and each variant's best factor is chosen on
    # validation AP (RESULTS.md, "The learning rate, chosen on validation").
    lr = factor * _demo_learning_rate(detector)
    return dataclasses.replace(
        run,
        name=f"{run.name}_lr{factor}x",
        overrides=(*run.overrides, f"{LR_FLAG}={lr}"),
        baseline=f"{run.baseline}_lr{factor}x" if run.baseline else run.name,
        control=f"{run.control}_lr{factor}x" if run.control else None,
    )


def _demo_learning_rate(detector: str) -> float:
    """The demo budget's base learning rate of ``detector`` (what the lr rows scale)."""
    return configs.get_config(f"{detector}_r18", "synthetic,bnn,demo").optimizer.base_learning_rate


def _ablation(detector: str) -> list[Run]:
    """The paper's Table 1 on the benchmark: which levels DFR decodes, which loss terms, and
    lambda; every row 1-bit + DFR from ``start_topology``, against ``bnn``."""
    del detector
    rows = [
        Run("bnn", "bnn", init_from="start_topology"),
        Run("dfr", "dfr", init_from="start_topology", baseline="bnn", control="dfr_zero"),
    ]
    settings = {
        "dfr_p2": ("--config.dfr.levels=(2,)",),
        "dfr_p2_p6": ("--config.dfr.levels=(2,3,4,5,6)",),
        "dfr_full": ("--config.dfr.mode=full",),
        "dfr_foreground": ("--config.dfr.mode=foreground",),
        "dfr_background": ("--config.dfr.mode=background",),
        # A control: the decoder asked for a blank image everywhere, so L_DFR carries neither
        # the image nor the boxes and can only pull the decoded features' scale down.
        "dfr_zero": ("--config.dfr.mode=zero",),
        # L_DFR is a per-pixel mean here (losses/dfr.py), about 0.3 against an L_det of about 1
        # at the demo budget, so the paper's lambda = 0.04 may be too weak to matter.
        "dfr_lambda_0.2": ("--config.loss.dfr_weight=0.2",),
        "dfr_lambda_1": ("--config.loss.dfr_weight=1.0",),
        "dfr_lambda_4": ("--config.loss.dfr_weight=4.0",),
        # The demo's decoder (16 wide, one block) ends near an all-zero output's L_DFR: the
        # full config's (64 wide, two blocks) tests whether its capacity is what is missing.
        "dfr_decoder_64": ("--config.dfr.decoder_width=64", "--config.dfr.decoder_blocks=2"),
    }
    rows += [
        Run(name, "dfr", flags, "start_topology", baseline="bnn")
        for name, flags in settings.items()
    ]
    return rows


GRIDS: dict[str, Callable[[str], list[Run]]] = {
    "comparison": _comparison,
    "recipes": _recipes,
    "ablation": _ablation,
}


def grid(detector: str, name: str = "comparison", rows: Sequence[str] = ()) -> list[Run]:
    """The runs of ``detector``'s grid ``name``, each after the runs it needs; ``rows`` keeps
    only those rows (and what they need). See the module docstring."""
    check_choice("detector", detector, DETECTORS)
    check_choice("grid", name, sorted(GRIDS))
    runs = {run.name: run for run in _starts() + GRIDS[name](detector)}
    for row in rows:
        scaled = SCALED_ROW.fullmatch(row)
        if row not in runs and scaled and scaled["row"] in runs:
            base = runs[scaled["row"]]
            if base.shared:
                raise ValueError(f"{row!r}: the starts train once, at the budget's learning rate")
            runs[row] = _scaled_learning_rate(base, int(scaled["factor"]), detector)
    unknown = [row for row in rows if row not in runs]
    if unknown:
        raise ValueError(f"Grid {name!r} has no rows {unknown}; its rows: {sorted(runs)}")
    ordered: dict[str, Run] = {}

    def add(run: Run) -> None:
        for needed in run.needs:
            add(runs[needed])
        ordered.setdefault(run.name, run)

    for run in runs.values():
        if not rows or run.name in rows:
            add(run)
    return list(ordered.values())


def _workdir(root: str, run: Run, seed: int) -> str:
    return os.path.join(root, run.name, f"seed{0 if run.shared else seed}")


def _main_command(
    detector: str,
    run: Run,
    seed: int,
    root: str,
    budget: Sequence[str],
    mode: str,
    starts_root: str | None = None,
) -> list[str]:
    """The ``main`` command of ``run``'s ``mode`` ('train' or 'eval'); what the run needs (its
    start, its teacher: shared starts) is read under ``starts_root`` (default: ``root``)."""
    starts = starts_root or root
    command = [
        sys.executable,
        "-m",
        "dfrdet_jax.main",
        f"--config={configs.path(f'{detector}_r18')}:synthetic,{run.variant},demo",
        f"--workdir={_workdir(root, run, seed)}",
        f"--mode={mode}",
        f"--config.seed={0 if run.shared else seed}",
        *budget,
        *run.overrides,
    ]
    if run.init_from and mode == "train":
        command += [
            f"--config.init_from={os.path.join(starts, run.init_from, 'seed0')}",  # a shared start
            "--config.init_from_checkpoint=best",
        ]
    if run.teacher and mode == "train":
        command.append(f"--config.distill.teacher={os.path.join(starts, run.teacher, 'seed0')}")
    if mode == "eval":
        command += ["--config.eval.split=test", "--config.eval.checkpoint=best"]
    return command


def _run_logged(command: list[str], log_path: str, dry_run: bool) -> None:
    print(shlex.join(command), flush=True)  # quoted: it can be pasted into a shell
    if dry_run:
        return
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if status.returncode:
        raise RuntimeError(f"exit status {status.returncode}; see {log_path}")


@contextlib.contextmanager
def _exclusive(workdir: str):
    """Holds ``workdir``'s lock file while the body trains and tests its run, so that two grid
    commands never train one run (a shared start) side by side: the second waits, then finds the
    run finished. Closing the file lets the lock go, as does the end of its process, killed or
    not."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: another command is running {workdir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_metrics_path(workdir: str) -> str | None:
    """The eval mode's file of the best checkpoint's test metrics; None before it exists."""
    found = glob.glob(os.path.join(workdir, "eval_test_best_*.json"))
    return found[0] if found else None


def validation_ap(workdir: str) -> float | None:
    """The validation AP that ``workdir``'s metrics.jsonl logged at its best checkpoint's step
    (the step in its test metrics' file name, ``test_metrics_path``): what chose the checkpoint
    and any setting of its row. None before the test metrics, or when that step logged none."""
    test_path, metrics_path = test_metrics_path(workdir), os.path.join(workdir, "metrics.jsonl")
    if test_path is None or not os.path.exists(metrics_path):
        return None
    step = int(os.path.basename(test_path).removesuffix(".json").rsplit("_", 1)[1])
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    values = [r["eval/AP"] for r in records if r.get("step") == step and "eval/AP" in r]
    return values[-1] if values else None  # the last: a resumed run may log a step twice


def run_grid(
    detector: str,
    root: str,
    seeds: Sequence[int],
    budget: Sequence[str],
    dry_run: bool = False,
    on_result: Callable[[dict], None] = lambda results: None,
    runs: Sequence[Run] | None = None,
    starts_root: str | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """Trains and tests every run of ``runs`` (default: ``grid(detector)``) not done yet;
    returns {row: {seed: test metrics}} (shared starts included), passing the results so far
    to ``on_result`` after each run. ``starts_root``: take the shared starts, finished, from
    that root (trained at its budget) instead of training them under ``root``."""
    results: dict[str, dict[int, dict[str, float]]] = {}
    for run in grid(detector) if runs is None else runs:
        for seed in [0] if run.shared else seeds:
            workdir = _workdir(starts_root if run.shared and starts_root else root, run, seed)
            if test_metrics_path(workdir) is None:
                if run.shared and starts_root:
                    raise FileNotFoundError(
                        f"{run.name}: {workdir} holds no finished start (no "
                        "eval_test_best_*.json); train it there first, with this command's "
                        f"--root {starts_root} and without --starts_root"
                    )
                with contextlib.nullcontext() if dry_run else _exclusive(workdir):
                    # Another command may have finished the run while this one waited.
                    if test_metrics_path(workdir) is None:
                        for mode, log in (("train", "train.log"), ("eval", "test.log")):
                            command = _main_command(
                                detector, run, seed, root, budget, mode, starts_root
                            )
                            _run_logged(command, os.path.join(workdir, log), dry_run)
            done = test_metrics_path(workdir)
            if done is not None:
                with open(done) as f:
                    metrics = json.load(f)
                validation = validation_ap(workdir)
                if validation is not None:
                    metrics[VALIDATION_AP] = validation
                results.setdefault(run.name, {})[seed] = metrics
                on_result(results)
    return results


def summarize(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """{row: {metric: {'mean', 'std', 'n', 'values', 'seeds'}}} (std with ddof=1; 0 for one
    seed; values[i] is seed seeds[i]'s, in %), for ``TABLE_METRICS`` and, where every seed has
    it, ``VALIDATION_AP``."""
    summary = {}
    for name, by_seed in results.items():
        row = {}
        validated = all(VALIDATION_AP in m for m in by_seed.values())
        for metric in TABLE_METRICS + ((VALIDATION_AP,) if validated else ()):
            values = [100.0 * by_seed[s][metric] for s in sorted(by_seed)]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row[metric] = {
                "mean": float(np.mean(values)),
                "std": std,
                "n": len(values),
                "values": values,
                "seeds": sorted(by_seed),
            }
        summary[name] = row
    return summary


def collapsed_seeds(row: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(seed, its AP, the row's median AP) of each seed of a summary row whose AP is under
    ``COLLAPSED_FRACTION`` of the row's median: a run that diverged or stalled, which the
    row's mean and spread include (rows of 3 seeds or more; none otherwise)."""
    values, seeds = row["AP"]["values"], row["AP"]["seeds"]
    if len(values) < 3:
        return []
    median = float(np.median(values))
    return [(s, v, median) for s, v in zip(seeds, values) if v < COLLAPSED_FRACTION * median]


def _difference(summary, a: str, b: str, metric: str = "AP") -> tuple[float, float] | None:
    """(mean_a - mean_b, its standard error) over independent seeds, or None."""
    if a not in summary or b not in summary:
        return None
    x, y = summary[a][metric], summary[b][metric]
    se = math.sqrt(x["std"] ** 2 / x["n"] + y["std"] ** 2 / y["n"])
    return x["mean"] - y["mean"], se


def seed_differences(summary, a: str, b: str, metric: str = "AP") -> list[float]:
    """a's value - b's (%) for each seed both summary rows have, in a's seed order. A seed's
    runs share its start, so pairing them removes the start's part of the spread."""
    x, y = summary[a][metric], summary[b][metric]
    by_seed = dict(zip(y["seeds"], y["values"]))
    return [v - by_seed[s] for s, v in zip(x["seeds"], x["values"]) if s in by_seed]


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean, with the sample standard deviation; 0 for one value)
    of a non-empty sequence."""
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), se


def paired_difference(summary, a: str, b: str, metric: str = "AP") -> tuple[float, float, int]:
    """(mean of ``seed_differences``, its standard error, the number of common seeds); NaNs
    and 0 without a common seed."""
    diffs = seed_differences(summary, a, b, metric)
    if not diffs:
        return math.nan, math.nan, 0
    return (*mean_and_standard_error(diffs), len(diffs))


def markdown_table(detector: str, summary, command: str, runs: Sequence[Run]) -> str:
    """The README's table: mean +- std over seeds of every AI-TOD metric (%) on the test split
    and of the validation AP the runs were selected on ('-' where a run logged none), then the
    comparisons the paper makes: each row's share of the real row's AP (when the table holds
    one real row, ``real`` or an lr row of it), and each row's difference from its ``baseline``
    and its ``control`` with its standard error, over independent seeds and (from two common
    seeds on) paired by seed."""
    columns = TABLE_METRICS + (VALIDATION_AP,)
    head = "| row | seeds | " + " | ".join(TABLE_METRICS) + " | validation AP |"
    lines = [f"`{command}`", "", head, "|" + "---|" * (len(columns) + 2)]
    for name, row in summary.items():
        cells = [
            f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f}" if m in row else "-" for m in columns
        ]
        lines.append(f"| {detector} {name} | {row['AP']['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    rows = [run for run in runs if not run.shared and run.name in summary]
    real = [run.name for run in rows if run.variant == "real"]
    if len(real) == 1:  # the reference of every other row (``real``, or one lr row of it)
        for run in rows:
            if run.name != real[0]:
                ratio = summary[run.name]["AP"]["mean"] / max(summary[real[0]]["AP"]["mean"], 1e-9)
                lines.append(f"- {run.name} keeps {100 * ratio:.0f} % of the {real[0]} AP.")
    pairs = [(run.name, other) for run in rows for other in (run.baseline, run.control) if other]
    for a, b in pairs:
        for metric in ("AP", "AP_vt", "AP_t"):
            diff = _difference(summary, a, b, metric)
            if diff is None:
                continue
            if min(summary[a][metric]["n"], summary[b][metric]["n"]) < 2:
                spread = "one seed: no standard error"
            else:
                spread = f"standard error {diff[1]:.1f}"
                paired, paired_se, common = paired_difference(summary, a, b, metric)
                if common >= 2:
                    spread += (
                        f"; paired by seed over {common}: {paired:+.1f}, "
                        f"standard error {paired_se:.2f}"
                    )
            lines.append(f"- {a} - {b}, {metric}: {diff[0]:+.1f} ({spread})")
    for name, row in summary.items():
        for seed, ap, median in collapsed_seeds(row):
            lines.append(
                f"- **{name}, seed {seed}: AP {ap:.1f}, under {COLLAPSED_FRACTION:.0%} of the "
                f"row's median {median:.1f}**: a run that diverged or stalled (see its train.log); "
                "the row's mean and spread include it."
            )
    return "\n".join(lines) + "\n"


def plot(detector: str, summary, path: str) -> None:
    """AP and AP_vt per row with standard-deviation error bars, as a PNG."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    names = list(summary)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    for offset, metric in ((-0.2, "AP"), (0.2, "AP_vt")):
        means = [summary[n][metric]["mean"] for n in names]
        stds = [summary[n][metric]["std"] for n in names]
        ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, label=metric)
    ax.set_xticks(x, names)
    ax.set_ylabel("% (test split)")
    ax.set_title(f"{detector}: mean and standard deviation over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(
    detector: str, root: str, results, *, command: str, runs: Sequence[Run], name: str = "results"
) -> dict[str, Any]:
    """``name``.json, .md and .png under ``root`` (``runs``: the grid, for the comparisons);
    returns the summary."""
    summary = summarize(results)
    with open(os.path.join(root, f"{name}.json"), "w") as f:
        json.dump(
            {"detector": detector, "command": command, "runs": results, "summary": summary},
            f,
            indent=1,
        )
    with open(os.path.join(root, f"{name}.md"), "w") as f:
        f.write(markdown_table(detector, summary, command, runs))
    if summary:
        plot(detector, summary, os.path.join(root, f"{name}.png"))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", default="fcos", choices=DETECTORS)
    parser.add_argument("--grid", default="comparison", choices=sorted(GRIDS))
    parser.add_argument(
        "--rows", default="", help="comma-separated rows to run (and the runs they need); all: ''"
    )
    parser.add_argument("--root", required=True, help="folder of the grid's workdirs and results")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the rows")
    parser.add_argument(
        "--budget",
        default="",
        help="extra --config.* flags for every run, space-separated, given with '=' since they "
        "start with dashes: --budget='--config.train.num_steps=600 --config.model.fpn_width=64'",
    )
    parser.add_argument(
        "--starts_root",
        default="",
        help="take the shared starts, finished, from this root (trained at its budget) instead "
        "of training them under --root: the rows at another budget from the same starts",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="print the commands of unfinished runs and tabulate the finished ones; run nothing",
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget = args.budget.split()
    os.makedirs(args.root, exist_ok=True)
    # The command that runs the grid: --dry_run, which only tabulates the finished runs, left out.
    command = "python -m dfrdet_jax.experiments " + shlex.join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--dry_run"
    )
    runs = grid(args.detector, args.grid, [r for r in args.rows.split(",") if r.strip()])
    # One results file per grid: grids share a root (and so their common rows' runs).
    name = "results" if args.grid == "comparison" else f"results_{args.grid}"
    write = functools.partial(
        write_outputs, args.detector, args.root, command=command, runs=runs, name=name
    )
    results = run_grid(
        args.detector, args.root, seeds, budget, args.dry_run, write, runs, args.starts_root or None
    )
    if results:
        write(results)
        with open(os.path.join(args.root, f"{name}.md")) as f:
            print(f.read())


if __name__ == "__main__":
    main()
