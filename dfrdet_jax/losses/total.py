"""The total training loss of DFR-Det (paper, Eq. 11): L = L_det + gamma * sum L_R +
lambda * L_DFR, plus, when a run distils from a teacher, each distillation term times its weight.

gamma, lambda and the distillation weights are applied here and nowhere else. The parts come in
already computed (the detection losses of a head, the L_R terms the binary layers sow, the
distillation terms), except L_DFR, which is built here from the decoder's reconstruction, the
images and the ground-truth boxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dfrdet_jax import layers
from dfrdet_jax.losses import dfr


def total_loss(
    detection_losses: Mapping[str, jnp.ndarray],
    sown_losses: Mapping[str, Any],
    reconstruction: jnp.ndarray | None,
    images: jnp.ndarray,
    boxes: jnp.ndarray,
    box_valid: jnp.ndarray,
    ignore: jnp.ndarray,
    *,
    reconstruction_weight: float,
    dfr_weight: float,
    dfr_mode: str,
    distillation: Mapping[str, tuple[jnp.ndarray, float]] | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Eq. 11 on a batch, and every part of it as a metric.

    Args:
      detection_losses: a head's loss dict; its ``loss_*`` entries (float32 scalars) sum to
        L_det, other entries (e.g. positive counts) pass through as metrics.
      sown_losses: the ``layers.LOSSES_COLLECTION`` collection of ``model.apply``, holding each
        binary layer's L_R (empty for a real network: sum L_R = 0).
      reconstruction: float [B, H, W, 3], the DFR decoder's phi(F); None without a decoder,
        which leaves L_DFR out (and ``loss_dfr`` out of the metrics).
      images: float32 [B, H, W, 3], the input images normalised as the network input (the
        target X of L_DFR); read only with a reconstruction.
      boxes: float32 [B, N, 4] ground truth, xyxy, pixels of ``images``.
      box_valid: bool [B, N]; padding slots are False.
      ignore: bool [B, N]; ignore regions, left out of L_DFR.
      reconstruction_weight: gamma (paper: 1e-4).
      dfr_weight: lambda (paper: 0.04).
      dfr_mode: the L_DFR variant, one of ``dfr.MODES``.
      distillation: {name: (unweighted float32 scalar, weight)} of ``losses.distill`` terms,
        e.g. {'features': ...}; None or empty without a teacher.
    Returns:
      (L float32 scalar, metrics): metrics hold ``detection_losses`` plus ``loss_det``,
      ``loss_reconstruction`` (sum L_R, unweighted), ``loss_dfr`` (unweighted; only with a
      reconstruction), ``loss_distill_<name>`` (unweighted) and ``loss`` (= L).
    """
    metrics = dict(detection_losses)
    loss_det = sum(v for k, v in metrics.items() if k.startswith("loss_"))
    loss_rec = layers.total_reconstruction_loss(sown_losses)
    loss = loss_det + reconstruction_weight * loss_rec
    metrics.update(loss_det=loss_det, loss_reconstruction=loss_rec)
    if reconstruction is not None:
        height, width = images.shape[1:3]
        fg, ignore_mask = jax.vmap(lambda b, v, i: dfr.foreground_mask(b, v, i, height, width))(
            boxes, box_valid, ignore
        )
        loss_dfr = dfr.dfr_loss(reconstruction, images, fg, ignore_mask, mode=dfr_mode)
        loss = loss + dfr_weight * loss_dfr
        metrics["loss_dfr"] = loss_dfr
    for name, (value, weight) in (distillation or {}).items():
        loss = loss + weight * value
        metrics[f"loss_distill_{name}"] = value
    metrics["loss"] = loss
    return loss, metrics
