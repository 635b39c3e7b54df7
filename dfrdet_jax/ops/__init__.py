"""Box math, NMS and target assignment as pure jnp functions (jit and vmap friendly).

boxes   area, IoU/GIoU, format conversions, clipping, FCOS ltrb and R-CNN delta coders
nms     static-shape class-wise NMS
assign  FCOS points, tiny-object regression ranges and target assignment
"""

from dfrdet_jax.ops import assign, boxes, nms  # noqa: F401
