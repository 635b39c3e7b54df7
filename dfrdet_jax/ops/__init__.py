"""Box math, NMS and target assignment as pure jnp functions (jit and vmap friendly).

boxes   area, IoU/GIoU, format conversions, clipping, FCOS ltrb and R-CNN delta coders
nms     static-shape class-wise NMS
assign  FCOS points, tiny-object regression ranges and target assignment; max-IoU matching
anchors anchor boxes of every feature-map cell
"""

from dfrdet_jax.ops import anchors, assign, boxes, nms  # noqa: F401
