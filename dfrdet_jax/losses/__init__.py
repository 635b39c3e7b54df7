"""Detection and DFR losses as pure jnp functions; they return sums or means as documented.

focal  sigmoid focal loss
iou    GIoU / IoU box losses, centre-ness target and loss
dfr    foreground mask from boxes and the DFR reconstruction loss
smooth_l1  smooth L1 / L1 loss of box deltas
distill    feature imitation and sigmoid KL towards a frozen real teacher
total  the total loss of Eq. 11: L_det + gamma * sum L_R + lambda * L_DFR
"""

from dfrdet_jax.losses import dfr, distill, focal, iou, smooth_l1, total  # noqa: F401
