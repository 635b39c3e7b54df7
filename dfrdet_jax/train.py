"""Training: model and optimizer from the config, one jit-compiled train step, the loop.

The step computes L = L_det + gamma * sum L_R + lambda * L_DFR (paper, Eq. 11) on a global batch
sharded over a ``data`` mesh axis (state replicated), applies SGD with momentum, weight decay,
gradient clipping and the warm-up + step-decay schedule, and returns every loss part as a metric.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dfrdet_jax import checkpointing, layers, prefetch
from dfrdet_jax.losses import dfr
from dfrdet_jax.models import registry
from dfrdet_jax.models.detectors import normalize_images

Array = jax.Array
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus BatchNorm running statistics."""

    batch_stats: Any = None


# ---------------------------------------------------------------------------------------------
# Optimizer.


def global_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The paper's lr (0.005 at batch 2) scaled linearly to the configured global batch."""
    opt = config.optimizer
    return opt.base_learning_rate * config.train.batch_size / opt.base_batch_size


def make_learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from ``warmup_factor * lr`` to lr, then x``decay_factor`` at each decay epoch.

    Decay epochs are read as fractions of ``config.train.num_epochs`` of the run's
    ``total_steps`` (epochs 8 and 11 of 12 by default), so a run shortened with
    ``train.num_steps`` keeps the same shape of schedule.
    """
    opt = config.optimizer
    peak = global_learning_rate(config)
    boundaries = {
        int(round(epoch / config.train.num_epochs * total_steps)): opt.decay_factor
        for epoch in opt.decay_epochs
    }
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    if opt.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(peak * opt.warmup_factor, peak, opt.warmup_steps)
    return lambda step: jnp.where(step < opt.warmup_steps, warmup(step), decay(step))


def _decay_mask(params):
    """Weight decay on kernels only (ndim > 1), not on biases, norms, scales or alphas."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


OPTIMIZERS = ("sgd", "adamw")


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """ValueError for an unknown ``config.optimizer.name``, before anything is built."""
    if config.optimizer.name not in OPTIMIZERS:
        raise ValueError(
            f"Unknown config.optimizer.name {config.optimizer.name!r}; valid choices: "
            f"{list(OPTIMIZERS)}"
        )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then SGD with momentum and coupled weight decay (the paper's), or AdamW
    (decoupled weight decay; the usual choice for 1-bit networks trained from scratch, as
    ReActNet), on the learning-rate schedule of ``make_learning_rate``. Weight decay applies to
    kernels only (``_decay_mask``)."""
    check_optimizer(config)
    opt = config.optimizer
    learning_rate = make_learning_rate(config, total_steps)
    clip = (
        optax.clip_by_global_norm(opt.grad_clip_norm)
        if opt.grad_clip_norm > 0
        else optax.identity()
    )
    if opt.name == "adamw":
        b1, b2 = opt.adam_betas
        return optax.chain(
            clip,
            optax.adamw(learning_rate, b1, b2, weight_decay=opt.weight_decay, mask=_decay_mask),
        )
    return optax.chain(
        clip,
        optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
        optax.sgd(learning_rate, momentum=opt.momentum),
    )


# ---------------------------------------------------------------------------------------------
# State and steps.


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    rng: Array,
    image_hw: tuple[int, int],
    total_steps: int,
) -> TrainState:
    """Initialises parameters (with the DFR decoder when the config uses one) and optimizer."""
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    variables = jax.jit(
        functools.partial(model.init, train=True, reconstruct=bool(config.dfr.levels))
    )(rng, dummy)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config, total_steps),
    )
    # A concrete int32 step (not a weakly typed Python 0), so the step compiles only once.
    return state.replace(step=jnp.zeros((), jnp.int32))


def compute_losses(
    params,
    batch_stats,
    batch: dict[str, Array],
    rng: Array,
    *,
    model: nn.Module,
    config: ml_collections.ConfigDict,
) -> tuple[Array, tuple[dict, Any]]:
    """The total loss of a batch and its parts; returns (loss, (metrics, new batch_stats)).

    rng: PRNG key of the step's random draws (Faster R-CNN's anchor and RoI sampling)."""
    images = normalize_images(batch["image"], model.dtype or jnp.float32)
    reconstruct = bool(config.dfr.levels)
    outputs, new_state = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        reconstruct=reconstruct,
        mutable=["batch_stats", layers.LOSSES_COLLECTION],
        **registry.apply_kwargs(config, batch, train=True, rng=rng),
    )
    metrics = registry.detection_loss(config, outputs, batch)
    loss_det = sum(v for k, v in metrics.items() if k.startswith("loss_"))
    loss_rec = layers.total_reconstruction_loss(new_state.get(layers.LOSSES_COLLECTION, {}))
    loss = loss_det + config.loss.reconstruction_weight * loss_rec
    metrics.update(loss_det=loss_det, loss_reconstruction=loss_rec)
    if reconstruct:
        height, width = batch["image"].shape[1:3]
        fg, ignore = jax.vmap(lambda b, v, i: dfr.foreground_mask(b, v, i, height, width))(
            batch["boxes"], batch["box_valid"], batch["ignore"]
        )
        loss_dfr = dfr.dfr_loss(
            outputs["reconstruction"],
            normalize_images(batch["image"]),
            fg,
            ignore,
            mode=config.dfr.mode,
        )
        loss = loss + config.loss.dfr_weight * loss_dfr
        metrics["loss_dfr"] = loss_dfr
    metrics["loss"] = loss
    return loss, (metrics, new_state["batch_stats"])


def train_step(
    state: TrainState,
    batch: dict[str, Array],
    *,
    model: nn.Module,
    config: ml_collections.ConfigDict,
    learning_rate: optax.Schedule,
) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on a global batch; returns the new state and the step's metrics.

    ``learning_rate`` is the optimizer's schedule, only read here to report the step's rate.
    """
    grad_fn = jax.value_and_grad(
        functools.partial(compute_losses, model=model, config=config), has_aux=True
    )
    # A key per step, from the seed: a resumed run draws exactly what it would have drawn.
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    (_, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = learning_rate(state.step)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, metrics


def predict_step(
    state: TrainState,
    batch: dict[str, Array],
    *,
    model: nn.Module,
    config: ml_collections.ConfigDict,
):
    """Detections of a batch (inference: no decoder), static shapes (see registry.postprocess)."""
    images = normalize_images(batch["image"], model.dtype or jnp.float32)
    outputs = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        images,
        train=False,
        **registry.apply_kwargs(config, batch, train=False),
    )
    return registry.postprocess(config, outputs, batch)


# ---------------------------------------------------------------------------------------------
# Sharding.


def make_mesh() -> Mesh:
    """A 1-d mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def check_batch_divides(batch_size: int, what: str) -> None:
    devices = jax.device_count()
    if batch_size % devices:
        raise ValueError(
            f"{what}={batch_size} does not divide over {devices} devices; set it to a "
            f"multiple of {devices}"
        )


def make_sharded_train_step(
    config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh, total_steps: int
):
    """``train_step`` jit-compiled for ``mesh``: state replicated (and donated), batch split
    over the ``data`` axis. Call it with a replicated state and ``to_global_batch`` output."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(
            train_step,
            model=model,
            config=config,
            learning_rate=make_learning_rate(config, total_steps),
        ),
        in_shardings=(replicated, NamedSharding(mesh, PartitionSpec(DATA_AXIS))),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding):
    """This process's slice of the batch -> global arrays sharded over ``data``."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


# ---------------------------------------------------------------------------------------------
# The loop.


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


class Progress:
    """A tqdm bar with ETA on an interactive terminal; nothing otherwise (the periodic log lines
    carry steps/s and the ETA there)."""

    def __init__(self, total_steps: int, start_step: int):
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            import tqdm  # pylint: disable=g-import-not-at-top

            self.bar = tqdm.tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True
            )

    def update(self, metrics: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PreemptionGuard:
    """Turns SIGTERM (how clusters pre-empt a job) into a flag the loop polls, so training can
    save a checkpoint and return instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _to_python(value):
    value = np.asarray(value) if not isinstance(value, (str, dict, list)) else value
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating
    periodically; returns the last evaluation's metrics."""
    from dfrdet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfrdet_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

    registry.validate_config(config)
    check_optimizer(config)
    check_batch_divides(config.train.batch_size, "config.train.batch_size")
    check_batch_divides(config.eval.batch_size, "config.eval.batch_size")
    os.makedirs(workdir, exist_ok=True)
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
    )
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
    mesh = make_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    data_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    state = create_train_state(config, model, jax.random.key(config.seed), image_hw, total_steps)
    state = jax.device_put(state, replicated)

    checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    train_iter = iter(train_data.loader)
    state, data_state = checkpoints.restore_latest(state)
    if data_state is not None:
        train_data.set_iterator_state(train_iter, data_state)
    start_step = int(state.step)
    if start_step:
        logging.info("Resumed from step %d in %s", start_step, workdir)

    step_fn = make_sharded_train_step(config, model, mesh, total_steps)
    logging.info(
        "Training %s (%s) for %d steps (%d per epoch), global batch %d on %d devices",
        config.model.name,
        config.variant,
        total_steps,
        steps_per_epoch,
        config.train.batch_size,
        jax.device_count(),
    )
    writer = MetricsWriter(workdir)
    progress = Progress(total_steps, start_step)
    profile_start, profile_stop = _profile_window(config)
    eval_metrics: dict[str, Any] = {}
    pending = None  # the previous step's metrics, read one step late so the host never stalls
    timer, timed_steps = time.time(), 0
    batches = prefetch.DevicePrefetcher(
        train_iter,
        functools.partial(to_global_batch, sharding=data_sharding),
        train_data.get_iterator_state,
        depth=config.train.prefetch_batches,
    )
    with PreemptionGuard() as preemption, batches:
        for step in range(start_step, total_steps):
            if step == profile_start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            local_batch, global_batch, input_state = next(batches)
            state, metrics = step_fn(state, global_batch)
            if pending is not None:
                _check_finite(*pending)
            pending = (step + 1, metrics, local_batch.get("image_id"))
            done, timed_steps = step + 1, timed_steps + 1
            if done == profile_stop:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            stop = done == total_steps or preemption.requested
            log_now = done % config.train.log_every_steps == 0 or stop
            save_now = done % config.train.checkpoint_every_steps == 0 or stop
            eval_now = done % eval_every == 0 or done == total_steps
            if log_now or save_now or eval_now:
                _check_finite(*pending)  # never save or report a broken state
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
                timer, timed_steps = time.time(), 0
            if save_now:
                checkpoints.save(done, state, input_state)
            if eval_now:
                eval_metrics = evaluate_lib.evaluate_state(config, model, state, mesh)
                writer.write(done, eval_metrics, "eval/")
                checkpoints.save_best(done, state, eval_metrics.get(config.eval.best_metric))
                timer, timed_steps = time.time(), 0  # evaluation time is not training speed
            if preemption.requested:
                logging.warning("Stopped at step %d on SIGTERM; the checkpoint is saved", done)
                break
    progress.close()
    writer.close()
    checkpoints.wait()
    return eval_metrics


def _profile_window(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(first step traced, step after the last) from config.train.profile_*; (-1, -1): none."""
    num = config.train.get("profile_num_steps", 0)
    if num <= 0:
        return -1, -1
    first = config.train.get("profile_start_step", 10)
    return first, first + num


def _check_finite(step: int, metrics: dict[str, Array], image_ids) -> None:
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        ids = [] if image_ids is None else np.asarray(image_ids).tolist()
        parts = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        raise FloatingPointError(
            f"Non-finite loss {loss} at step {step} (images {ids}); loss parts: {parts}. "
            "No checkpoint was written for this step."
        )
