"""Box math, NMS and target assignment as pure jnp functions (jit and vmap friendly).

boxes         area, IoU/GIoU, format conversions, clipping, FCOS ltrb and R-CNN delta coders
nms           static-shape class-wise NMS
points        the point grid: every feature-map cell's centre, level by level
anchors       anchor boxes of every feature-map cell, centred on the points
ground_truth  the padded ground truth and label conventions every assigner shares
fcos_assign   FCOS: tiny-object regression ranges and point-to-box assignment
matcher       max-IoU matching of anchors or RoIs to boxes (RetinaNet, Faster R-CNN)
chunking      row chunks under lax.map, bounding the memory of assignment and matching
sampling      balanced random positive/negative draws (Faster R-CNN)
roi_align     multi-level RoIAlign
"""

from dfrdet_jax.ops import (  # noqa: F401
    anchors,
    boxes,
    chunking,
    fcos_assign,
    ground_truth,
    matcher,
    nms,
    points,
    roi_align,
    sampling,
)
