"""Checkpoints of training in the workdir with orbax: model, optimizer, step and data iterator.

Layout: ``workdir/checkpoints/<step>/{state,data}`` keeps the last ``keep`` steps, written
asynchronously (training goes on while files are written); ``workdir/checkpoints_best/<step>``
keeps the one with the best evaluation metric. ``state`` holds the step, parameters, BatchNorm
statistics and optimizer state; ``data`` the input pipeline's iterator state (JSON), so a resumed
run sees exactly the batches an uninterrupted run would have seen. ``workdir/config.json`` is the
config of the run that writes them (``write_run_config``).

A workdir of another config is never used nor written over: ``check_run_config`` compares the
fields that say what the checkpoints are (``IDENTITY_FIELDS``) with its config.json, and
restoring compares the stored tensors with the model's before reading them; either mismatch is a
``WorkdirMismatchError``. Restoring walks back from the newest step: a checkpoint that cannot be
read (a run killed while writing it, a damaged file) is reported and the one before it is used.
A training run first moves it to ``workdir/checkpoints_damaged/``: orbax never saves a step at or
below the latest one on disk, so the steps trained again would otherwise never be saved.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dfrdet_jax import configs
from dfrdet_jax.choices import check_choice

CHECKPOINT_KINDS = ("latest", "best")
RUN_CONFIG = "config.json"
DAMAGED_DIR = "checkpoints_damaged"
# What a workdir's checkpoints are: the network's tensors and what they mean (variant, model,
# dfr, how FCOS reads its box outputs), the optimizer state's layout and the classes (the data
# set). Everything else (schedule, loss weights, data paths and sizes, evaluation, logging) may
# change between the starts of one run; model.pretrained only starts a new run and model.dtype
# only sets the compute precision.
IDENTITY_FIELDS = ("variant", "model", "dfr", "fcos.box_activation", "optimizer.name", "data.name")
IDENTITY_EXCEPTIONS = ("model.pretrained", "model.dtype")


class WorkdirMismatchError(ValueError):
    """The workdir holds the checkpoints of another config (not damaged ones): resuming from
    them or training over them would mix or lose runs."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _within(name: str, fields: tuple[str, ...]) -> bool:
    return any(name == field or name.startswith(field + ".") for field in fields)


def _identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The ``IDENTITY_FIELDS`` of a config (as JSON holds it), flat."""
    return {
        name: value
        for name, value in _flatten(config_dict).items()
        if _within(name, IDENTITY_FIELDS) and not _within(name, IDENTITY_EXCEPTIONS)
    }


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as config.json holds it (tuples as lists), so both compare alike."""
    return json.loads(config.to_json_best_effort())


def _describe(config_dict: dict[str, Any]) -> str:
    """A config in a few words: 'fcos bnn on synthetic'."""
    model, data = config_dict.get("model", {}), config_dict.get("data", {})
    return f"{model.get('name')} {config_dict.get('variant')} on {data.get('name')}"


def read_run_config(workdir: str) -> dict[str, Any] | None:
    """The config stored in ``workdir`` (JSON values); None when it stores none."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); it should hold the config of the run in "
                f"{workdir}: restore it, or remove it to use the workdir without that check"
            ) from error


def stored_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir`` (its config.json, ``config_from_json``);
    FileNotFoundError when it stores none, since its network cannot then be rebuilt."""
    stored = read_run_config(workdir)
    if stored is None:
        raise FileNotFoundError(f"{workdir}: no config.json, so its network cannot be rebuilt")
    return config_from_json(stored)


def config_from_json(config_dict: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config as ``config.json`` holds it back to a ConfigDict (JSON's lists to the tuples
    configs hold). A field the stored config lacks (an option added since that run was written)
    takes today's default for its family, dataset and variant (``configs.defaults_of``), and is
    logged: a run of an older version can still be read, restored and compared."""

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    config = ml_collections.ConfigDict(tuples(config_dict))
    defaults = configs.defaults_of(config_dict)
    if defaults is not None:
        filled = _fill_missing(config, defaults)
        if filled:
            logging.info(
                "The stored config of %s lacks %s (options added since): today's defaults used",
                _describe(config_dict),
                ", ".join(filled),
            )
    return config


def _fill_missing(
    config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, prefix: str = ""
) -> list[str]:
    """Adds to ``config`` every field of ``defaults`` it lacks; returns their dotted names."""
    filled = []
    for key, value in defaults.items():
        if key not in config:
            config[key] = value
            filled.append(prefix + key)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
            config[key], ml_collections.ConfigDict
        ):
            filled += _fill_missing(config[key], value, f"{prefix}{key}.")
    return filled


def check_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """WorkdirMismatchError naming both configs and every differing field when ``workdir``
    stores a config whose ``IDENTITY_FIELDS`` differ from ``config``'s. A field only one of them
    has (an option added or removed between versions) is not compared."""
    stored = read_run_config(workdir)
    if stored is None:
        return
    new = _as_json(config)
    old_fields, new_fields = _identity(stored), _identity(new)
    differing = sorted(
        k for k in old_fields.keys() & new_fields.keys() if old_fields[k] != new_fields[k]
    )
    if differing:
        fields = "; ".join(
            f"{k}: {old_fields[k]!r} there, {new_fields[k]!r} now" for k in differing
        )
        raise WorkdirMismatchError(
            f"{workdir} holds a run of another config ({_describe(stored)}, see "
            f"{os.path.join(workdir, RUN_CONFIG)}) than this one ({_describe(new)}): {fields}. "
            "Use a new --workdir, or that run's config."
        )


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Stores ``config`` as ``workdir/config.json`` (on process 0): the config of the checkpoints
    this run writes."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, RUN_CONFIG)
        with open(path + ".tmp", "w") as f:
            json.dump(_as_json(config), f, indent=1)
        os.replace(path + ".tmp", path)  # a run killed while writing leaves the old one whole


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    """The item handlers, given up front so that a checkpoint's metadata reads before any
    restore."""
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


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


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'params/head/kernel': shape} of every array of a state or of orbax's metadata of one
    (dict keys, sequence indices and attribute names all become path parts)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): (
            tuple(leaf.shape)
        )
        for path, leaf in leaves
    }


def tensor_differences(stored: dict, expected: dict, limit: int = 4) -> str:
    """The first ``limit`` tensors missing, unexpected or of another shape, in words ('' when
    the two {path: shape} maps of ``tree_shapes`` agree)."""
    lines = [f"{k} missing" for k in sorted(expected.keys() - stored.keys())]
    lines += [f"{k} not in this model" for k in sorted(stored.keys() - expected.keys())]
    lines += [
        f"{k}: {stored[k]} stored, {expected[k]} expected"
        for k in sorted(stored.keys() & expected.keys())
        if stored[k] != expected[k]
    ]
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


class Checkpointer:
    """Saves and restores a ``TrainState`` (+ iterator state) under ``workdir``.

    read_only: for reading the checkpoints of a finished or another run (eval, predict, export,
    warm starts, teachers): creates no folder and moves nothing.
    """

    def __init__(
        self, workdir: str, keep: int = 3, best_mode: str = "max", read_only: bool = False
    ):
        self.workdir = os.path.abspath(workdir)
        self.read_only = read_only
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints_best"),
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=not read_only,
                best_fn=lambda metrics: metrics["value"],
                best_mode=best_mode,
            ),
        )

    def save(self, step: int, state, data_state: dict | None) -> None:
        """Starts writing checkpoint ``step`` (returns once the arrays are copied to host).

        RuntimeError when orbax declines it: it writes no step at or below its latest."""
        if not self.manager.save(step, args=_save_args(state, data_state)):
            raise RuntimeError(
                f"Checkpoint {step} was not written: {self.directory} already holds step "
                f"{self.manager.latest_step()}"
            )

    def save_best(self, step: int, state, value: float | None) -> None:
        """Keeps ``state`` in checkpoints_best if ``value`` beats the best so far (None: skip)."""
        if value is None or value < 0:  # -1: the metric is undefined (no ground truth)
            return
        if not self.best.save(step, args=_save_args(state, None), metrics={"value": float(value)}):
            # Only after a resume from before the best step: its state is this run's anyway.
            logging.warning(
                "Step %d is not compared with checkpoints_best, which holds the later step %d",
                step,
                self.best.latest_step(),
            )

    def latest_step(self, which: str = "latest") -> int | None:
        """The newest step of the ``which`` ('latest' or 'best') checkpoints; None: none."""
        return self._manager(which).latest_step()

    def _manager(self, which: str) -> ocp.CheckpointManager:
        check_choice("checkpoint", which, CHECKPOINT_KINDS)
        return self.manager if which == "latest" else self.best

    def _check_tensors(self, manager, step: int, expected: dict, run: str) -> None:
        """WorkdirMismatchError when checkpoint ``step`` stores other tensors than ``expected``
        ({path: shape}); nothing when its metadata cannot be read (restoring tells if it is
        damaged)."""
        try:
            stored = tree_shapes(manager.item_metadata(step)["state"].tree)
        except Exception:  # pylint: disable=broad-except
            return
        if stored == expected:
            return
        written_by = read_run_config(self.workdir)
        written_by = (
            f"{_describe(written_by)} ({os.path.join(self.workdir, RUN_CONFIG)})"
            if written_by
            else "a run that stored no config.json"
        )
        raise WorkdirMismatchError(
            f"Checkpoint {step} in {manager.directory} holds another model or optimizer than "
            f"{run} builds ({tensor_differences(stored, expected)}); it was written by "
            f"{written_by}. Use a new --workdir, or that run's config."
        )

    def _set_aside(self, manager, steps: list[int]) -> None:
        """Moves the damaged checkpoints ``steps`` of ``manager`` to workdir/checkpoints_damaged
        (on process 0), saying so in the log and on stdout."""
        if jax.process_index() == 0:
            for step in steps:
                destination = os.path.join(self.workdir, DAMAGED_DIR, str(step))
                copies = 0
                while os.path.exists(destination):  # damaged again after a resume
                    copies += 1
                    destination = os.path.join(self.workdir, DAMAGED_DIR, f"{step}.{copies}")
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                os.rename(os.path.join(manager.directory, str(step)), destination)
                message = (
                    f"Checkpoint {step} in {manager.directory} cannot be read: moved to "
                    f"{destination}, so that the steps trained again are saved"
                )
                logging.error("%s", message)
                print(message, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dfrdet_jax: damaged checkpoints set aside")
        manager.reload()

    def _newest_readable(self, which: str, restore_args, check=None):
        """(step, restored items) of the newest ``which`` checkpoint that reads; None if none.

        ``check(manager, step)`` runs before each is read. A checkpoint that cannot be read is
        reported and the one before it is tried; unless read-only, it is moved aside."""
        manager = self._manager(which)
        found, damaged = None, []
        for step in sorted(manager.all_steps(), reverse=True):
            if check is not None:
                check(manager, step)
            try:
                found = step, manager.restore(step, args=restore_args(step))
                break
            except Exception as error:  # pylint: disable=broad-except
                logging.error(
                    "Checkpoint %d in %s cannot be restored (%s: %s); trying the previous one",
                    step,
                    manager.directory,
                    type(error).__name__,
                    error,
                )
                damaged.append(step)
        if damaged and not self.read_only:
            self._set_aside(manager, damaged)
        return found

    def restore(
        self, state, which: str = "latest", config: ml_collections.ConfigDict | None = None
    ):
        """(state from the newest readable ``which`` checkpoint, its iterator state or None);
        None when there is no readable checkpoint.

        ``state`` gives the target structure and shardings. Best checkpoints hold no iterator
        state. Raises WorkdirMismatchError when a checkpoint stores other tensors than ``state``
        has: a checkpoint of another config, named in the message with ``config`` (this run's).
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        directory = self._manager(which).directory
        expected = tree_shapes(target)
        run = f"this config ({_describe(_as_json(config))})" if config else "this config"

        def restore_args(step):
            items = {"state": ocp.args.StandardRestore(target)}
            if os.path.isdir(os.path.join(directory, str(step), "data")):
                items["data"] = ocp.args.JsonRestore()
            return ocp.args.Composite(**items)

        found = self._newest_readable(
            which,
            restore_args,
            lambda manager, step: self._check_tensors(manager, step, expected, run),
        )
        if found is None:
            return None
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

    def restore_variables(
        self, which: str = "latest", step: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(step, {'params': ..., 'batch_stats': ...}) of the newest readable ``which``
        checkpoint, as numpy in the saved structure (no target: any model's checkpoint reads,
        e.g. to start a 1-bit run from a real one). ``step``: that checkpoint instead
        (FileNotFoundError naming the steps there when it is absent)."""

        def restore_args(step):
            del step
            return ocp.args.Composite(state=ocp.args.StandardRestore())

        if step is None:
            found = self._newest_readable(which, restore_args)
        else:
            manager = self._manager(which)
            if step not in manager.all_steps():
                raise FileNotFoundError(
                    f"No {which} checkpoint {step} in {manager.directory}; its steps: "
                    f"{sorted(manager.all_steps())}"
                )
            found = step, manager.restore(step, args=restore_args(step))
        if found is None:
            raise FileNotFoundError(
                f"No readable {which} checkpoint in {self._manager(which).directory}"
            )
        step, restored = found
        items = restored["state"]
        variables = {"params": items["params"], "batch_stats": items["batch_stats"] or {}}
        return step, jax.tree.map(np.asarray, variables)

    def wait(self) -> None:
        """Returns once every save started is on disk."""
        self.manager.wait_until_finished()
        self.best.wait_until_finished()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> bool:
        self.wait()
        return False
