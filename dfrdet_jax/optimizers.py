"""The optimizer of a config: learning-rate schedule, weight-decay mask, and a table from
``config.optimizer.name`` to the update rule that follows gradient clipping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from dfrdet_jax.choices import check_choice
from dfrdet_jax.models import detectors


def global_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The paper's lr (0.005 at batch 2) scaled linearly to the configured global batch."""
    opt = config.optimizer
    return opt.base_learning_rate * config.train.batch_size / opt.base_batch_size


def make_learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from ``warmup_factor * lr`` to lr, then x``decay_factor`` at each decay epoch.

    Decay epochs are read as fractions of ``config.train.num_epochs`` of the run's
    ``total_steps`` (epochs 8 and 11 of 12 by default), so a run shortened with
    ``train.num_steps`` keeps the same shape of schedule.

    Returns:
      step (int32 scalar) -> learning rate (float32 scalar).
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


def weight_decay_mask(params, exclude: frozenset[tuple[str, ...]] = frozenset()):
    """True where weight decay applies: kernels only (ndim > 1), not biases, norms, scales or
    alphas, nor the parameter paths in ``exclude``. Returns a tree of bools shaped as
    ``params``."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: p.ndim > 1 and path not in exclude for path, p in flat.items()}
    )


Mask = Callable[[Any], Any]


def _sgd(opt: ml_collections.ConfigDict, learning_rate: optax.Schedule, mask: Mask):
    """SGD with momentum and coupled weight decay (the paper's)."""
    return (
        optax.add_decayed_weights(opt.weight_decay, mask=mask),
        optax.sgd(learning_rate, momentum=opt.momentum),
    )


def _adamw(opt: ml_collections.ConfigDict, learning_rate: optax.Schedule, mask: Mask):
    """AdamW, decoupled weight decay: the usual choice for 1-bit networks trained from scratch
    (ReActNet)."""
    b1, b2 = opt.adam_betas
    return (optax.adamw(learning_rate, b1, b2, weight_decay=opt.weight_decay, mask=mask),)


# name -> (config.optimizer, schedule, weight-decay mask) -> the transforms after gradient
# clipping, in order. A tuple rather than a chain, so the optimizer state stays one flat tuple
# (checkpoint layout).
OPTIMIZERS: dict[
    str,
    Callable[
        [ml_collections.ConfigDict, optax.Schedule, Mask], tuple[optax.GradientTransformation, ...]
    ],
] = {"sgd": _sgd, "adamw": _adamw}


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """ValueError for an unknown ``config.optimizer.name`` or a negative
    ``config.dfr.base_learning_rate``, before anything is built."""
    check_choice("config.optimizer.name", config.optimizer.name, OPTIMIZERS)
    if config.dfr.base_learning_rate < 0:
        raise ValueError(
            f"config.dfr.base_learning_rate must be >= 0 (0: the run's), got "
            f"{config.dfr.base_learning_rate}"
        )


def decoder_learning_rate_factor(config: ml_collections.ConfigDict) -> float:
    """The DFR decoder's learning rate as a multiple of the run's: ``config.dfr.base_learning_rate``
    over ``config.optimizer.base_learning_rate`` (1 when the former is 0)."""
    decoder_lr = config.dfr.base_learning_rate
    return decoder_lr / config.optimizer.base_learning_rate if decoder_lr > 0 else 1.0


def scale_subtree(name: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates under the top-level key ``name`` by ``factor``; stateless.

    After the update rule, which ends in ``-lr * (...)`` for both rules here (AdamW's decoupled
    decay included), this is that subtree's learning rate times ``factor``."""

    def update(updates, state, params=None):
        del params
        if name not in updates:
            return updates, state
        scaled = jax.tree.map(lambda u: u * jnp.asarray(factor, u.dtype), updates[name])
        return {**updates, name: scaled}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    config: ml_collections.ConfigDict,
    total_steps: int,
    latent_kernels: frozenset[tuple[str, ...]] = frozenset(),
) -> optax.GradientTransformation:
    """Gradient clipping (global norm ``grad_clip_norm``; none when 0), then the update rule
    ``OPTIMIZERS[config.optimizer.name]`` on the schedule of ``make_learning_rate``. Weight
    decay applies to kernels only (``weight_decay_mask``), and not to ``latent_kernels`` (the
    parameter paths of the 1-bit layers' latent weights) when
    ``config.optimizer.latent_weight_decay`` is False, as ReActNet's second step and Bi-Real
    train them. The DFR decoder's updates are scaled by ``decoder_learning_rate_factor`` (a
    transform added only when it is not 1, so the optimizer state of other runs is unchanged)."""
    check_optimizer(config)
    opt = config.optimizer
    learning_rate = make_learning_rate(config, total_steps)
    clip = (
        optax.clip_by_global_norm(opt.grad_clip_norm)
        if opt.grad_clip_norm > 0
        else optax.identity()
    )
    exclude = frozenset() if opt.latent_weight_decay else frozenset(latent_kernels)
    mask = functools.partial(weight_decay_mask, exclude=exclude)
    transforms = [clip, *OPTIMIZERS[opt.name](opt, learning_rate, mask)]
    decoder_factor = decoder_learning_rate_factor(config)
    if decoder_factor != 1.0:
        transforms.append(scale_subtree(detectors.DECODER, decoder_factor))
    return optax.chain(*transforms)
