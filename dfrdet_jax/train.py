"""Training: ``train_and_evaluate(config, workdir)``, the loop that runs the train step.

It checks everything it can before the first step (the config, the workdir's config and
checkpoints, the evaluation split, ground truth and best metric), builds the data, model, state
and sharded step from the config (``steps``, ``sharding``), resumes from the workdir's latest
checkpoint, and on schedule (and always at the last step) logs metrics, saves checkpoints and
evaluates (``evaluate``), saving before it evaluates. SIGTERM saves and stops cleanly.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from dfrdet_jax import (
    checkpointing,
    distill,
    evaluate,
    evaluation,
    host_memory,
    optimizers,
    prefetch,
    run_utils,
    sharding,
    steps,
    warm_start,
)
from dfrdet_jax import data as data_lib
from dfrdet_jax.models import registry


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[steps.TrainState, dict[str, Any]]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating
    periodically.

    Returns:
      (the final train state, replicated over all devices; the last evaluation's metrics, as
      ``evaluation.evaluate`` names them: empty on processes other than 0, and when a SIGTERM
      stopped the run before any evaluation).
    Raises:
      checkpointing.WorkdirMismatchError: ``workdir`` holds a run of another config (nothing in
        it is changed).
    """
    registry.validate_config(config)
    distill.validate(config)
    optimizers.check_optimizer(config)
    run_utils.check_schedule(config)
    sharding.check_batch_divides(config.train.batch_size, "config.train.batch_size")
    sharding.check_batch_divides(config.eval.batch_size, "config.eval.batch_size")
    checkpointing.check_run_config(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    host_memory.apply_config(config)
    process_count = jax.process_count()

    train_data = data_lib.build_dataset(
        config.data,
        "train",
        train=True,
        batch_size=config.train.batch_size // process_count,
        seed=config.seed,
        num_workers=config.train.num_workers,
        shard_index=jax.process_index(),
        shard_count=process_count,
        example_map=registry.pipeline_targets(config),
    )
    # Built and scored once now: a bad eval split, ground truth or best metric fails here, not
    # after the first epoch.
    eval_data = evaluate.eval_dataset(config)
    evaluate.check_evaluation(config, eval_data)
    steps_per_epoch = max(train_data.num_images // config.train.batch_size, 1)
    total_steps = (
        config.train.num_steps
        if config.train.num_steps > 0
        else config.train.num_epochs * steps_per_epoch
    )
    eval_every = (
        config.train.eval_every_steps if config.train.eval_every_steps > 0 else steps_per_epoch
    )
    image_hw = (config.data.image_size, config.data.image_size)  # square padded batches

    model = registry.build_model(config, num_classes=train_data.num_classes)
    if registry.head_drowned_by_real_levels(config):
        logging.warning(
            "The quantized head reads the real FPN's levels unnormalised, whose scale drowns its "
            "first units' binary branches; --config.model.head_input_norm=True normalises them "
            "(+4.9 AP for the 1-bit FCOS, 6 seeds: RESULTS.md, 'A 1-bit head on a real FPN')"
        )
    mesh = sharding.make_mesh()
    replicated = sharding.replicated_sharding(mesh)
    checkpoints = checkpointing.Checkpointer(
        workdir,
        keep=config.train.keep_checkpoints,
        best_mode="min" if evaluation.lower_is_better(config.eval.best_metric) else "max",
    )
    train_iter = iter(train_data.loader)
    # A resumed run restores into the state's shapes; only a new one initialises parameters
    # (and traces the state once, not twice).
    restored = None
    if checkpoints.latest_step() is not None:
        restored = checkpoints.restore(
            steps.abstract_train_state(config, model, image_hw, total_steps, replicated),
            config=config,
        )
    if restored is None:
        state = steps.create_train_state(
            config, model, jax.random.key(config.seed), image_hw, total_steps
        )
        state = jax.device_put(state, replicated)
    else:
        state, data_state = restored
        if data_state is not None:
            try:
                train_data.set_iterator_state(train_iter, data_state)
            except ValueError as error:  # grain: the saved position is of other records
                raise data_lib.DataError(
                    f"{workdir}: the training data changed since checkpoint {int(state.step)} "
                    "was saved (images, their number, the batch size, the process count or the "
                    "seed), so its place in the data cannot be restored exactly. Restore the "
                    "data, or continue from its weights in a new workdir with "
                    f"--config.init_from={workdir}. Input pipeline: {str(error).splitlines()[0]}"
                ) from error
    checkpointing.write_run_config(workdir, config)
    start_step = int(state.step)
    if start_step:
        logging.info("Resumed from step %d in %s", start_step, workdir)
    else:
        state = warm_start.apply(config, state)

    teacher = distill.load_teacher(config, train_data.num_classes, image_hw, replicated)
    step_fn = steps.make_sharded_train_step(config, model, mesh, total_steps, teacher)
    logging.info(
        "Training %s (%s) for %d steps (%d per epoch), global batch %d on %d devices",
        config.model.name,
        config.variant,
        total_steps,
        steps_per_epoch,
        config.train.batch_size,
        jax.device_count(),
    )
    writer = run_utils.MetricsWriter(workdir)
    progress = run_utils.Progress(total_steps, start_step)
    spikes = run_utils.SpikeWatch(workdir, config.train.spike_factor)
    profile_start, profile_stop = run_utils.profile_window(config)
    eval_metrics: dict[str, Any] = {}
    pending = None  # the previous step's metrics, read one step late so the host never stalls
    timer, timed_steps = time.time(), 0
    stopped_at = None  # the step a SIGTERM stopped the run at
    batches = prefetch.DevicePrefetcher(
        train_iter,
        functools.partial(sharding.to_global_batch, sharding=sharding.batch_sharding(mesh)),
        train_data.get_iterator_state,
        depth=config.train.prefetch_batches,
    )
    # Leaving it waits for every save started, whether the loop ends or fails.
    with run_utils.PreemptionGuard() as preemption, batches, checkpoints:
        for step in range(start_step, total_steps):
            if step == profile_start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            local_batch, global_batch, input_state = next(batches)
            state, metrics = step_fn(state, global_batch)
            if pending is not None:
                run_utils.check_finite(*pending)
            pending = (step + 1, metrics, local_batch.get("image_id"))
            done, timed_steps = step + 1, timed_steps + 1
            if done == profile_stop:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            stop = preemption.should_stop(done) or done == total_steps
            log_now = done % config.train.log_every_steps == 0 or stop
            eval_now = done % eval_every == 0 or done == total_steps
            # Saved before evaluating: a failing evaluation loses no training.
            save_now = done % config.train.checkpoint_every_steps == 0 or stop or eval_now
            if log_now or save_now:
                run_utils.check_finite(*pending)  # never save or report a broken state
            progress.update()
            if log_now:
                summary = dict(jax.device_get(metrics))
                rate = timed_steps / max(time.time() - timer, 1e-9)
                summary.update(
                    steps_per_second=rate,
                    images_per_second=rate * config.train.batch_size,
                    eta_minutes=(total_steps - done) / max(rate, 1e-9) / 60,
                )
                writer.write(done, summary, "train/")
                spikes.check(done, summary)
                timer, timed_steps = time.time(), 0
            if save_now:
                checkpoints.save(done, state, input_state)
            if eval_now:
                eval_metrics = evaluate.evaluate_state(config, model, state, mesh, eval_data)
                writer.write(done, eval_metrics, "eval/")
                checkpoints.save_best(done, state, eval_metrics.get(config.eval.best_metric))
                timer, timed_steps = time.time(), 0  # evaluation time is not training speed
            if preemption.requested:
                if not save_now:  # the signal came after the stop check, while logging
                    run_utils.check_finite(*pending)
                    checkpoints.save(done, state, input_state)
                stopped_at = done
                break
    progress.close()
    writer.close()
    if stopped_at is not None:
        logging.warning(
            "Stopped at step %d on SIGTERM; checkpoint %d is saved in %s",
            stopped_at,
            stopped_at,
            checkpoints.directory,
        )
    return state, eval_metrics
