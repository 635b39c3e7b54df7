"""The train state and the step functions built from a config: the loss of a batch, one
optimizer step, detections of a batch, and the train step jit-compiled for a device mesh.

Each factory returns a pure function of (state, batch), so tests and notebooks can jit and call
the same steps the training loop runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh

from dfrdet_jax import complexity, distill, layers, optimizers, sharding
from dfrdet_jax.losses import total
from dfrdet_jax.models import registry
from dfrdet_jax.models.detectors import normalize_images

# XLA options for a program that runs once: the parameter initialisation. Its random draws (a
# threefry loop per parameter tensor) make it slow to compile at XLA:CPU's default level, and
# its speed does not matter: create_train_state of the demo 1-bit + DFR FCOS took 23.6 s before
# and 10.3 s with these, the parameters within 1 ulp (benchmarks/README.md, "XLA's CPU
# options"). Other backends compile it as they compile anything.
RUN_ONCE_CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}

Array = jax.Array
Batch = dict[str, Array]  # the batch format of dfrdet_jax.data, global arrays


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus BatchNorm running statistics."""

    batch_stats: Any = None


def _state_initializer(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    image_hw: tuple[int, int],
    total_steps: int,
) -> Callable[[Array], TrainState]:
    """``init(rng) -> TrainState``: parameters (with the DFR decoder when the config uses one)
    and optimizer state, as one function to trace."""
    latent_kernels = frozenset()
    if not config.optimizer.latent_weight_decay:  # find the 1-bit kernels (an abstract trace)
        trace = complexity.trace_layers(model, image_hw, train=False)
        latent_kernels = frozenset(trace.binary_kernels)
    tx = optimizers.make_optimizer(config, total_steps, latent_kernels)

    def init(rng: Array) -> TrainState:
        dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
        variables = model.init(rng, dummy, train=True, reconstruct=bool(config.dfr.levels))
        state = TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            tx=tx,
        )
        # A concrete int32 step (not a weakly typed Python 0), so the step compiles only once.
        return state.replace(step=jnp.zeros((), jnp.int32))

    return init


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    rng: Array,
    image_hw: tuple[int, int],
    total_steps: int,
) -> TrainState:
    """Initialises parameters (with the DFR decoder when the config uses one) and optimizer.

    Args:
      rng: PRNG key of the parameter initialisation.
      image_hw: (height, width) in pixels of the padded batches.
      total_steps: the run's length in steps, which the learning-rate schedule spans.
    """
    # One program: the optimizer's state built op by op would compile an XLA program per
    # parameter shape.
    init = _state_initializer(config, model, image_hw, total_steps)
    options = RUN_ONCE_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(init).lower(rng).compile(compiler_options=options)(rng)


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    image_hw: tuple[int, int],
    total_steps: int,
    sharding: jax.sharding.Sharding,
) -> TrainState:
    """The state ``create_train_state`` makes, as ``jax.ShapeDtypeStruct`` leaves placed with
    ``sharding``, from an abstract trace: nothing is compiled or computed. The target a
    checkpoint restores into (``evaluate.restored_state``), where initialising parameters only
    to overwrite them would compile and run the whole initialisation."""
    shapes = jax.eval_shape(
        _state_initializer(config, model, image_hw, total_steps), jax.random.key(0)
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def loss_and_metrics(
    params,
    batch_stats,
    batch: Batch,
    rng: Array,
    teacher_variables: Any = None,
    *,
    model: nn.Module,
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module | None = None,
) -> tuple[Array, tuple[dict[str, Array], Any]]:
    """The total loss of a batch (Eq. 11, ``losses.total``, plus distillation with a teacher)
    and its parts, in training mode.

    Args:
      params, batch_stats: the model's variables.
      batch: a global batch (``image`` uint8 [B, H, W, 3], ``boxes`` [B, N, 4] xyxy pixels,
        ``box_valid``, ``ignore``, ...).
      rng: PRNG key of the step's random draws (Faster R-CNN's anchor and RoI sampling).
      teacher_variables, teacher_model: the frozen teacher of ``config.distill`` (both None
        without one; see ``dfrdet_jax.distill``).
    Returns:
      (loss float32 scalar, (metrics: name -> float32 scalar, new batch_stats)).
    """
    images = normalize_images(batch["image"], model.dtype or jnp.float32)
    reconstruct = bool(config.dfr.levels)
    outputs, new_state = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        reconstruct=reconstruct,
        features=teacher_model is not None,
        mutable=["batch_stats", layers.LOSSES_COLLECTION],
        **registry.apply_kwargs(config, batch, train=True, rng=rng),
    )
    distillation = None
    if teacher_model is not None:
        distillation = distill.distillation_terms(
            config, teacher_model, teacher_variables, images, outputs
        )
    loss, metrics = total.total_loss(
        registry.detection_loss(config, outputs, batch),
        new_state.get(layers.LOSSES_COLLECTION, {}),
        outputs["reconstruction"] if reconstruct else None,
        normalize_images(batch["image"]),
        batch["boxes"],
        batch["box_valid"],
        batch["ignore"],
        reconstruction_weight=config.loss.reconstruction_weight,
        dfr_weight=config.loss.dfr_weight,
        dfr_mode=config.dfr.mode,
        distillation=distillation,
    )
    return loss, (metrics, new_state["batch_stats"])


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    total_steps: int,
    teacher_model: nn.Module | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``train_step(state, batch, teacher_variables=None) -> (new state, metrics)``: one
    optimizer step on a global batch (distilling from ``teacher_model`` with the given
    variables when it is set). Metrics are the loss parts of ``loss_and_metrics`` plus
    ``grad_norm`` and the step's ``learning_rate`` (the schedule of ``total_steps``, as in the
    state's optimizer)."""
    learning_rate = optimizers.make_learning_rate(config, total_steps)
    grad_fn = jax.value_and_grad(
        functools.partial(
            loss_and_metrics, model=model, config=config, teacher_model=teacher_model
        ),
        has_aux=True,
    )

    def train_step(
        state: TrainState, batch: Batch, teacher_variables: Any = None
    ) -> tuple[TrainState, dict[str, Array]]:
        # A key per step, from the seed: a resumed run draws exactly what it would have drawn.
        rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
        (_, (metrics, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, rng, teacher_variables
        )
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = learning_rate(state.step)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return new_state, metrics

    return train_step


def make_predict_step(
    config: ml_collections.ConfigDict, model: nn.Module
) -> Callable[[TrainState, Batch], Any]:
    """``predict_step(state, batch) -> detections``: inference (no decoder) on a batch, static
    shapes, in the pixels of the batch's images (see ``registry.postprocess``)."""

    def predict_step(state: TrainState, batch: Batch):
        images = normalize_images(batch["image"], model.dtype or jnp.float32)
        outputs = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            images,
            train=False,
            **registry.apply_kwargs(config, batch, train=False),
        )
        return registry.postprocess(config, outputs, batch)

    return predict_step


def make_sharded_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: Mesh,
    total_steps: int,
    teacher: distill.Teacher | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """``make_train_step`` jit-compiled for ``mesh``: state replicated (and donated), batch
    split over the ``data`` axis, the teacher's variables (replicated) passed to every call.
    Call it with a replicated state and a batch from ``sharding.to_global_batch``. It compiles
    once per box-slot count N of the batches (``data.box_slots``), and logs each N it meets."""
    replicated = sharding.replicated_sharding(mesh)
    step = jax.jit(
        make_train_step(config, model, total_steps, teacher.model if teacher else None),
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    teacher_variables = teacher.variables if teacher else None
    box_slots_seen = set()

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        slots = batch["boxes"].shape[1]
        if slots not in box_slots_seen:  # a new shape: jax.jit compiles the step for it
            box_slots_seen.add(slots)
            logging.info("Compiling the train step for %d box slots", slots)
        return step(state, batch, teacher_variables)

    # Ahead of time (benchmarks read the compiled step's FLOPs): the executable of
    # ``train_step.lower(state, batch).compile()`` takes (state, batch, teacher variables).
    train_step.lower = lambda state, batch: step.lower(state, batch, teacher_variables)
    return train_step
