"""Knowledge distillation from a frozen real-valued teacher, as pure functions.

Two terms, as the distillation-based 1-bit detectors use them (LWS-Det, IDa-Det imitate FPN
features; ReActNet matches the teacher's outputs):

  feature_imitation   squared difference of the FPN maps relative to the teacher's mean square
                      (scale-free: a trained real FPN's maps are far from unit scale, so one
                      weight fits any width and level), averaged over the chosen levels;
  sigmoid_kl          the binary KL divergence of the student's per-class sigmoid scores from
                      the teacher's (the dense heads score each class with a sigmoid), summed
                      over classes and averaged over locations.

The teacher's values enter as constants (``stop_gradient``): only the student learns.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def feature_imitation(student: Sequence[Array], teacher: Sequence[Array]) -> Array:
    """(1 / L) sum_l mean((S_l - T_l)^2) / mean(T_l^2): a float32 scalar (1 for a student
    that outputs zeros).

    Args:
      student, teacher: L maps each, [B, h_l, w_l, C] with equal shapes level by level.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"Need equally many maps (>= 1), got {len(student)} and {len(teacher)}")
    per_level = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"Student map {s.shape} and teacher map {t.shape} differ in shape")
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        scale = jnp.maximum(jnp.mean(jnp.square(t)), 1e-12)
        per_level.append(jnp.mean(jnp.square(s.astype(jnp.float32) - t)) / scale)
    return jnp.mean(jnp.stack(per_level))


def sigmoid_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))) summed over classes, mean over the
    locations: a float32 scalar, zero when the logits agree.

    Args:
      student_logits, teacher_logits: [B, P, C], one logit per location (or anchor) and class.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "differ in shape"
        )
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    p = jax.nn.sigmoid(t)
    # p log(p / q) + (1 - p) log((1 - p) / (1 - q)) with q = sigmoid(s), in log-sigmoid form.
    kl = p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s)) + (1 - p) * (
        jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)
    )
    return jnp.mean(jnp.sum(kl, axis=-1))
