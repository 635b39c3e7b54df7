"""Inference and scoring: run a detector over a data split or a folder of images.

``evaluate_state`` scores a train state on the config's evaluation split with the tiny-object
metrics; ``evaluate_checkpoint`` is the CLI's ``eval`` mode, reading a checkpoint of a workdir
(``restored_state``, which the ``predict`` mode of dfrdet_jax/predict.py shares).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from dfrdet_jax import checkpointing, evaluation, sharding, steps
from dfrdet_jax import data as data_lib
from dfrdet_jax.models import registry

META_KEYS = ("image_id", "scale", "tile_offset")


def predict_fn(config, model, mesh: Mesh):
    """jit of ``steps.make_predict_step`` over a data-sharded batch.

    Returns f(state, local_batch) -> (Detections, meta) as numpy, both for the global batch, meta
    holding the batch's image ids, scales and (DOTA) tile offsets in the detections' order.
    """
    replicated = sharding.replicated_sharding(mesh)
    data_sharding = sharding.batch_sharding(mesh)
    predict_step = steps.make_predict_step(config, model)

    def step(state, batch):
        meta = {k: batch[k] for k in META_KEYS if k in batch}
        return predict_step(state, batch), meta

    step = jax.jit(step, in_shardings=(replicated, data_sharding), out_shardings=replicated)
    return lambda state, local_batch: jax.device_get(
        step(state, sharding.to_global_batch(local_batch, data_sharding))
    )


def predict_dataset(
    config: ml_collections.ConfigDict, model, state, mesh: Mesh, dataset
) -> evaluation.DetectionArrays:
    """COCO results (original-image pixels) for every image of ``dataset``, as arrays: the
    evaluation scores them without a Python object per detection."""
    predict = predict_fn(config, model, mesh)
    batches = []
    for local_batch in dataset.loader:
        detections, meta = predict(state, local_batch)
        batches.append(
            evaluation.detection_arrays(
                detections.boxes,
                detections.scores,
                detections.classes,
                detections.valid,
                meta["image_id"],
                meta["scale"],
                dataset.category_ids,
                tile_offsets=meta.get("tile_offset"),
            )
        )
    return evaluation.DetectionArrays.concatenate(batches)


def eval_dataset(config: ml_collections.ConfigDict):
    """This process's shard of ``config.eval.split``, in batches of ``config.eval.batch_size``."""
    process_count = jax.process_count()
    return data_lib.build_dataset(
        config.data,
        config.eval.split,
        train=False,
        batch_size=config.eval.batch_size // process_count,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=process_count,
    )


def check_evaluation(config: ml_collections.ConfigDict, dataset) -> None:
    """Scores no detections on ``dataset``'s ground truth, so that a bad ground truth or protocol
    fails before training rather than at its first evaluation, and checks that the protocol
    reports ``config.eval.best_metric`` (ValueError naming the metrics it reports)."""
    metrics = evaluation.evaluate(dataset.annotation_file, [], protocol=config.eval.protocol)
    reported = sorted(k for k, v in metrics.items() if isinstance(v, float))
    if config.eval.best_metric not in reported:
        raise ValueError(
            f"config.eval.best_metric={config.eval.best_metric!r} is not a metric of "
            f"config.eval.protocol={config.eval.protocol!r}, so no best checkpoint would ever be "
            f"kept; it reports {reported}"
        )


def evaluate_state(
    config: ml_collections.ConfigDict, model, state, mesh: Mesh, dataset=None
) -> dict[str, Any]:
    """Tiny-object metrics of ``state`` on ``config.eval.split`` (computed on process 0);
    ``dataset``: that split's ``eval_dataset``, built here when None."""
    if dataset is None:
        dataset = eval_dataset(config)
    results = predict_dataset(config, model, state, mesh, dataset)
    if jax.process_index() != 0:
        return {}
    metrics = evaluation.evaluate(dataset.annotation_file, results, protocol=config.eval.protocol)
    logging.info(
        "Evaluation on %s (%d detections):\n%s",
        config.eval.split,
        len(results),
        evaluation.format_table(metrics),
    )
    return metrics


def restored_state(config: ml_collections.ConfigDict, workdir: str):
    """(model, state restored from the ``config.eval.checkpoint`` ('latest' or 'best')
    checkpoint of workdir, mesh, dataset info).

    Raises FileNotFoundError when workdir has no readable checkpoint of that kind, and
    checkpointing.WorkdirMismatchError when it holds a run of another config.
    """
    checkpointing.check_run_config(workdir, config)
    info = data_lib.dataset_info(config.data)
    model = registry.build_model(config, num_classes=info.num_classes)
    image_hw = (config.data.image_size, config.data.image_size)
    mesh = sharding.make_mesh()
    state = steps.abstract_train_state(
        config, model, image_hw, 1, sharding.replicated_sharding(mesh)
    )
    which = config.eval.checkpoint
    restored = checkpointing.Checkpointer(workdir, read_only=True).restore(state, which, config)
    if restored is None:
        raise FileNotFoundError(
            f"No readable {which} checkpoint in {workdir} (see the log for damaged ones); train "
            "first with --mode train and the same --workdir"
        )
    state, _ = restored
    return model, state, mesh, info


def check_eval_batch(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the field for a config the model rejects or an eval batch size that
    does not divide over the devices."""
    registry.validate_config(config)
    sharding.check_batch_divides(config.eval.batch_size, "config.eval.batch_size")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The ``eval`` mode: metrics of the ``config.eval.checkpoint`` checkpoint on
    ``config.eval.split``, written to workdir/eval_<split>_<checkpoint>_<step>.json."""
    check_eval_batch(config)
    model, state, mesh, _ = restored_state(config, workdir)
    metrics = evaluate_state(config, model, state, mesh)
    if jax.process_index() == 0:
        name = f"eval_{config.eval.split}_{config.eval.checkpoint}_{int(state.step)}.json"
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            json.dump(metrics, f, indent=1)
        print(evaluation.format_table(metrics))
        logging.info("Wrote %s", path)
    return metrics
