"""Distillation from a frozen real-valued teacher (``config.distill``).

The teacher is a trained real-valued run (``config.distill.teacher``, its ``teacher_checkpoint``:
"best" or "latest"): the network its workdir's config.json describes (the real variant, or the
1-bit topology with real weights and activations, with the student's family, FPN width and
levels), without a decoder; a workdir without config.json holds the real variant of the
student's own config. In every training
step it runs in inference mode on the same images, and the student is pulled towards it by
``losses.distill``'s terms:

  feature_weight  FPN feature imitation on ``config.distill.levels`` (empty: every level),
                  as LWS-Det and IDa-Det distil;
  logit_weight    the binary KL of the per-class scores (FCOS, RetinaNet: their dense
                  ``cls_logits``; Faster R-CNN's RoI logits are not comparable, since teacher
                  and student sample different RoIs).

The teacher's variables live on the devices next to the train state and enter the jit-compiled
step as an argument, not as constants; checkpoints hold only the student.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dfrdet_jax import checkpointing
from dfrdet_jax.choices import check_choice
from dfrdet_jax.losses import distill as distill_losses
from dfrdet_jax.models import registry

Array = jax.Array
NO_LOGITS = ("faster_rcnn",)  # families whose classification logits cannot be matched


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its model and its variables ({'params', 'batch_stats'})."""

    model: nn.Module
    variables: Any


def enabled(config: ml_collections.ConfigDict) -> bool:
    return bool(config.distill.teacher)


def levels(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The FPN levels whose maps are imitated (``config.distill.levels``; empty: all)."""
    chosen = tuple(config.distill.levels)
    return chosen or registry.fpn_levels(config)


def _is_real_valued(config: ml_collections.ConfigDict) -> bool:
    """No layer quantizes: the real variant, or a 1-bit topology with both quantizers off."""
    binary = config.model.binary
    return config.variant == "real" or (
        not config.model.binary_parts
        or (binary.input_quantizer == "none" and binary.weight_quantizer == "none")
    )


def teacher_config(
    config: ml_collections.ConfigDict, stored: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The teacher's network: the config its workdir stores (``stored``, its config.json), which
    must be real-valued (the real variant, or the 1-bit topology with real weights and
    activations) with the student's family, FPN width and levels; without one, the real variant
    of ``config``. No decoder either way (inference only)."""
    if stored is None:
        teacher = copy.deepcopy(config)
        teacher.variant = "real"
        teacher.model.binary_parts = ()
    else:
        teacher = checkpointing.config_from_json(stored)
        if not _is_real_valued(teacher):
            raise ValueError(
                f"config.distill.teacher={config.distill.teacher!r} trained a quantized network "
                f"(variant {teacher.variant!r}, binary parts {tuple(teacher.model.binary_parts)}"
                "); a teacher is real-valued: the real variant, or the 1-bit topology with "
                "--config.model.binary.input_quantizer=none and weight_quantizer=none"
            )
        fields = ("name", "fpn_width", "min_level", "max_level")
        differ = [
            f"model.{f}: {teacher.model[f]!r} (teacher) vs {config.model[f]!r}"
            for f in fields
            if teacher.model[f] != config.model[f]
        ]
        if differ:
            raise ValueError(
                f"config.distill.teacher={config.distill.teacher!r} has other FPN maps than the "
                f"student, so they cannot be compared: {'; '.join(differ)}"
            )
    teacher.dfr.levels = ()
    teacher.loss.dfr_weight = 0.0
    teacher.distill.teacher = ""
    return teacher


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.distill`` before anything is built; raises ValueError."""
    d = config.distill
    if d.feature_weight < 0 or d.logit_weight < 0:
        raise ValueError(
            f"config.distill weights must be >= 0, got feature_weight={d.feature_weight}, "
            f"logit_weight={d.logit_weight}"
        )
    if not enabled(config):
        if d.feature_weight or d.logit_weight:
            raise ValueError(
                "config.distill.feature_weight / logit_weight > 0 need config.distill.teacher "
                "(the workdir of a trained real run of this config)"
            )
        return
    if not (d.feature_weight or d.logit_weight):
        raise ValueError(
            f"config.distill.teacher={d.teacher!r} is set but both distillation weights are 0; "
            "set config.distill.feature_weight and/or config.distill.logit_weight"
        )
    if d.logit_weight and config.model.name in NO_LOGITS:
        raise ValueError(
            f"config.distill.logit_weight needs a dense head (fcos, retinanet); "
            f"{config.model.name}'s RoI logits cannot be matched: use feature_weight"
        )
    registry.check_on_fpn_levels("config.distill.levels", levels(config), config)
    check_choice(
        "config.distill.teacher_checkpoint", d.teacher_checkpoint, checkpointing.CHECKPOINT_KINDS
    )
    if not os.path.isdir(os.path.join(os.path.expanduser(d.teacher), "checkpoints")):
        raise FileNotFoundError(f"config.distill.teacher={d.teacher!r} has no checkpoints folder")


def load_teacher(
    config: ml_collections.ConfigDict,
    num_classes: int,
    image_hw: tuple[int, int],
    sharding: jax.sharding.Sharding,
) -> Teacher | None:
    """The teacher of ``config`` with its variables placed with ``sharding``; None without one."""
    validate(config)
    if not enabled(config):
        return None
    workdir = os.path.expanduser(config.distill.teacher)
    model = registry.build_model(
        teacher_config(config, checkpointing.read_run_config(workdir)), num_classes
    )
    which = config.distill.teacher_checkpoint
    step, variables = checkpointing.Checkpointer(workdir, read_only=True).restore_variables(which)
    variables["params"] = {k: v for k, v in variables["params"].items() if k != "decoder"}
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
    expected = {k: expected.get(k, {}) for k in ("params", "batch_stats")}
    differences = checkpointing.tensor_differences(
        checkpointing.tree_shapes(variables), checkpointing.tree_shapes(expected)
    )
    if differences:
        raise ValueError(
            f"The teacher in {workdir} ({which} checkpoint, step {step}) does not match its "
            f"network (its config.json, or without one the real variant of this config): "
            f"{differences}"
        )
    print(f"Distilling from {workdir} ({which} checkpoint, step {step})", flush=True)
    return Teacher(model, jax.device_put(variables, sharding))


def distillation_terms(
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module,
    teacher_variables: Any,
    images: Array,
    student_outputs: dict[str, Any],
) -> dict[str, tuple[Array, float]]:
    """{name: (unweighted loss, weight)} for ``losses.total.total_loss``.

    Args:
      teacher_model, teacher_variables: the frozen teacher (``Teacher``'s fields).
      images: the normalised batch both networks see, [B, H, W, 3].
      student_outputs: the student's outputs with 'features' (and 'cls_logits' for logits).
    """
    d = config.distill
    want_logits = d.logit_weight > 0
    teacher_outputs = teacher_model.apply(
        teacher_variables, images, train=False, features=True, run_head=want_logits
    )
    teacher_outputs = jax.lax.stop_gradient(teacher_outputs)
    terms = {}
    if d.feature_weight > 0:
        index = [level - config.model.min_level for level in levels(config)]
        terms["features"] = (
            distill_losses.feature_imitation(
                [student_outputs["features"][i] for i in index],
                [teacher_outputs["features"][i] for i in index],
            ),
            d.feature_weight,
        )
    if want_logits:
        terms["logits"] = (
            distill_losses.sigmoid_kl(student_outputs["cls_logits"], teacher_outputs["cls_logits"]),
            d.logit_weight,
        )
    return terms
