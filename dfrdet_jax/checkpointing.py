"""Checkpoints of training in the workdir with orbax: model, optimizer, step and data iterator.

Layout: ``workdir/checkpoints/<step>/{state,data}`` keeps the last ``keep`` steps, written
asynchronously (training goes on while files are written); ``workdir/checkpoints_best/<step>``
keeps the one with the best evaluation metric. ``state`` holds the step, parameters, BatchNorm
statistics and optimizer state; ``data`` the input pipeline's iterator state (JSON), so a resumed
run sees exactly the batches an uninterrupted run would have seen.

Restoring walks back from the newest step: a checkpoint that cannot be read (a run killed while
writing it, a damaged file) is reported and the one before it is used.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


CHECKPOINT_KINDS = ("latest", "best")


def _state_items(state) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def _save_args(state, data_state: dict | None) -> ocp.args.Composite:
    items = {"state": ocp.args.StandardSave(_state_items(state))}
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    return ocp.args.Composite(**items)


class Checkpointer:
    """Saves and restores a ``TrainState`` (+ iterator state) under ``workdir``."""

    def __init__(self, workdir: str, keep: int = 3, best_mode: str = "max"):
        workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints_best"),
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda metrics: metrics["value"],
                best_mode=best_mode,
            ),
        )

    def save(self, step: int, state, data_state: dict | None) -> None:
        """Starts writing checkpoint ``step`` (returns once the arrays are copied to host)."""
        self.manager.save(step, args=_save_args(state, data_state))

    def save_best(self, step: int, state, value: float | None) -> None:
        """Keeps ``state`` in checkpoints_best if ``value`` beats the best so far (None: skip)."""
        if value is None or value < 0:  # -1: the metric is undefined (no ground truth)
            return
        self.best.save(step, args=_save_args(state, None), metrics={"value": float(value)})

    def latest_step(self, which: str = "latest") -> int | None:
        """The newest step of the ``which`` ('latest' or 'best') checkpoints; None: none."""
        return self._manager(which).latest_step()

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in CHECKPOINT_KINDS:
            raise ValueError(f"Unknown checkpoint {which!r}; valid choices: {CHECKPOINT_KINDS}")
        return self.manager if which == "latest" else self.best

    def _newest_readable(self, which: str, restore_args):
        """(step, restored items) of the newest ``which`` checkpoint that reads; None if none.

        A checkpoint that cannot be read is reported and the one before it is tried."""
        manager = self._manager(which)
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return step, manager.restore(step, args=restore_args(step))
            except Exception as error:  # pylint: disable=broad-except
                logging.error(
                    "Checkpoint %d in %s cannot be restored (%s: %s); trying the previous one",
                    step,
                    manager.directory,
                    type(error).__name__,
                    error,
                )
        return None

    def restore(self, state, which: str = "latest"):
        """(state from the newest readable ``which`` checkpoint, its iterator state or None).

        ``state`` gives the target structure and shardings; it is returned unchanged, with None,
        when there is no readable checkpoint. Best checkpoints hold no iterator state.
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        directory = self._manager(which).directory

        def restore_args(step):
            items = {"state": ocp.args.StandardRestore(target)}
            if os.path.isdir(os.path.join(directory, str(step), "data")):
                items["data"] = ocp.args.JsonRestore()
            return ocp.args.Composite(**items)

        found = self._newest_readable(which, restore_args)
        if found is None:
            return state, None
        step, restored = found
        logging.info("Restored checkpoint of step %d from %s", step, directory)
        items = restored["state"]
        restored_state = state.replace(
            step=items["step"],
            params=items["params"],
            batch_stats=items["batch_stats"],
            opt_state=items["opt_state"],
        )
        return restored_state, restored["data"] if "data" in restored else None

    def restore_variables(self, which: str = "latest") -> tuple[int, dict[str, Any]]:
        """(step, {'params': ..., 'batch_stats': ...}) of the newest readable ``which``
        checkpoint, as numpy in the saved structure (no target: any model's checkpoint reads,
        e.g. to start a 1-bit run from a real one)."""
        found = self._newest_readable(
            which, lambda step: ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        if found is None:
            raise FileNotFoundError(
                f"No readable {which} checkpoint in {self._manager(which).directory}"
            )
        step, restored = found
        items = restored["state"]
        variables = {"params": items["params"], "batch_stats": items["batch_stats"] or {}}
        return step, jax.tree.map(np.asarray, variables)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.best.wait_until_finished()
