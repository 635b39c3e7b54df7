"""What a training run needs around its steps: a metrics writer, a progress bar, a SIGTERM
guard, the profiler's step window, the check that a step's loss is finite and the watch for a
loss that jumps."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class MetricsWriter:
    """Writes metrics as JSON lines to ``workdir/metrics.jsonl``, to TensorBoard event files in
    ``workdir/tensorboard`` when ``tensorboardX`` is installed, and logs a summary line.

    Only process 0 writes files; every process logs.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.tensorboard = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
            except ImportError:
                logging.info("tensorboardX is not installed: metrics go to %s only", self.path)
            else:
                self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """One JSON line ``{"step": step, prefix + name: value, ...}``; scalars also go to
        TensorBoard and the log. Values may be arrays (written as numbers or lists)."""
        record = {"step": int(step), **{prefix + k: _to_python(v) for k, v in metrics.items()}}
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                for name, value in scalars.items():
                    self.tensorboard.add_scalar(name, value, step)
                self.tensorboard.flush()
        logging.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _to_python(value):
    """A metric value as JSON can hold it: size-1 arrays -> number, others -> nested lists."""
    value = np.asarray(value) if not isinstance(value, (str, dict, list)) else value
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value


class Progress:
    """A tqdm bar with ETA on an interactive terminal; nothing otherwise (the periodic log lines
    carry steps/s and the ETA there)."""

    def __init__(self, total_steps: int, start_step: int = 0, unit: str = "step"):
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            import tqdm  # pylint: disable=g-import-not-at-top

            self.bar = tqdm.tqdm(
                total=total_steps, initial=start_step, unit=unit, dynamic_ncols=True
            )

    def update(self, metrics: dict[str, float] | None = None, count: int = 1) -> None:
        """``count`` steps done; ``metrics`` (name -> number), if given, show beside the bar."""
        if self.bar is not None:
            self.bar.update(count)
            if metrics:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PreemptionGuard:
    """Turns SIGTERM (how clusters pre-empt a job) into a stop the loop polls with
    ``should_stop(step)``, so training can save a checkpoint and return instead of dying mid-step.

    In a multi-process run every process must stop at the same step (one that stops alone
    leaves the others waiting in the next step's collectives for ever), whichever of them the
    signal reached: there JAX's preemption service (started by ``jax.distributed.initialize``)
    catches it and agrees on the step, and ``should_stop`` must be called at every step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._agreed = False  # the stop step is agreed between processes

    def __enter__(self):
        self._agreed = jax.process_count() > 1
        if not self._agreed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step``: the same answer on every process."""
        if self._agreed and not self.requested:
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("Pre-empted: every process saves and stops at step %d", step)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class SpikeWatch:
    """Names a loss part or the gradient norm that jumps, as it happens: at each logged step,
    a ``loss*`` or ``grad_norm`` value above ``factor`` times its running level (an
    exponential mean, weight ``decay``, of its earlier logged values) is logged as a warning,
    and becomes the new level, so a jump is warned about once.

    A diverging module shows this way long before the loss is NaN: at 16x the lr an
    unnormalised DFR decoder took L_DFR from 0.36 to 89 in 50 steps, and the detector never
    recovered (RESULTS.md, "A steady decoder"). Training goes on; the warning names the checkpoints
    to compare.
    """

    def __init__(self, workdir: str, factor: float, decay: float = 0.9):
        self.workdir, self.factor, self.decay = workdir, factor, decay
        self.levels: dict[str, float] = {}
        self.last_step = 0

    def check(self, step: int, summary: dict[str, Any]) -> list[str]:
        """The names in ``summary`` (host scalars of ``step``) that jumped; warns for each."""
        jumped = []
        for name, value in summary.items():
            if not (name.startswith("loss") or name == "grad_norm") or np.ndim(value) != 0:
                continue
            value, level = float(value), self.levels.get(name)
            if self.factor > 0 and level is not None and level > 0 and value > self.factor * level:
                jumped.append(name)
                logging.warning(
                    "Step %d: %s = %.4g is %.0fx its running level %.4g. To find the module "
                    "that blew up: python benchmarks/activation_scales.py --workdir %s "
                    "--steps <a checkpoint at or before step %d>,<one after>",
                    step,
                    name,
                    value,
                    value / level,
                    level,
                    self.workdir,
                    self.last_step,
                )
            if level is None or name in jumped:  # a jump is the new level: warned once
                self.levels[name] = value
            else:
                self.levels[name] = self.decay * level + (1 - self.decay) * value
        self.last_step = step
        return jumped


def check_schedule(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the field when the training schedule cannot run: logging and
    checkpoint intervals must be at least one step, and a run needs steps or epochs."""
    t = config.train
    for field in ("log_every_steps", "checkpoint_every_steps"):
        if t[field] < 1:
            raise ValueError(f"config.train.{field} must be at least 1 (steps), got {t[field]}")
    if t.spike_factor < 0:
        raise ValueError(f"config.train.spike_factor must be 0 (off) or more, got {t.spike_factor}")
    if t.num_steps <= 0 and t.num_epochs <= 0:
        raise ValueError(
            "config.train.num_steps or config.train.num_epochs must be positive, got "
            f"{t.num_steps} and {t.num_epochs}"
        )


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(first step traced, step after the last) from config.train.profile_*; (-1, -1): none."""
    num = config.train.get("profile_num_steps", 0)
    if num <= 0:
        return -1, -1
    first = config.train.get("profile_start_step", 10)
    return first, first + num


def check_finite(step: int, metrics: dict[str, Any], image_ids) -> None:
    """FloatingPointError naming the step, its images and every loss part when
    ``metrics["loss"]`` is NaN or infinite.

    Args:
      step: the step count after the step that produced ``metrics``.
      metrics: name -> scalar (device or host) of that step.
      image_ids: int [B_local] ids of this process's images in the batch, or None.
    """
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        ids = [] if image_ids is None else np.asarray(image_ids).tolist()
        parts = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        raise FloatingPointError(
            f"Non-finite loss {loss} at step {step} (images {ids}); loss parts: {parts}. "
            "No checkpoint was written for this step."
        )
