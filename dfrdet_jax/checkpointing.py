"""Checkpoints of training in the workdir with orbax: model, optimizer, step and data iterator.

Layout: ``workdir/checkpoints/<step>/{state,data}``; the last ``keep`` steps are kept. The data
item is the input pipeline's iterator state (JSON), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def _state_items(state) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


class Checkpointer:
    """Saves and restores a ``TrainState`` (+ iterator state) under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state, data_state: dict | None) -> None:
        items = {"state": ocp.args.StandardSave(_state_items(state))}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, state):
        """(state restored from the latest checkpoint, its iterator state or None); the given
        ``state`` (as target structure and shardings) and None when there is no checkpoint."""
        step = self.manager.latest_step()
        if step is None:
            return state, None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        items = restored["state"]
        data_state = None
        if "data" in (self.manager.item_metadata(step) or {}):
            data_state = self.manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
            )["data"]
        logging.info("Restored checkpoint of step %d from %s", step, self.directory)
        return state.replace(
            step=items["step"],
            params=items["params"],
            batch_stats=items["batch_stats"],
            opt_state=items["opt_state"],
        ), data_state

    def wait(self) -> None:
        self.manager.wait_until_finished()
