"""RetinaNet with a ResNet-18 + FPN (P2-P6) backbone: real, 1-bit, 1-bit with DFR or LSQ 4-bit.

Argument: comma-separated ``<dataset>,<variant>[,demo][,smoke]``, as ``configs/fcos_r18.py``:
  dataset  synthetic | aitod | tinyperson | dota2
  variant  real (32-bit) | bnn (1-bit baseline) | dfr (1-bit + DFR decoder, DFR-Det) |
           lsq4 (LSQ 4-bit weights and inputs in the same convs and units as bnn)
  demo     the small, fast setting for the synthetic data (narrow network, 128 px, 1,200
           steps of AdamW)
  smoke    the demo shrunk to a one-minute run (P2-P4, widths 8-16, 64 px, 12 steps of SGD)

Anchors for tiny objects: the pyramid starts at P2 (stride 4) and the smallest anchor of a level
is 2x its stride (mmdetection's RetinaNet: P3-P7 and 4x), so P2's anchors are 8, 10 and 12.7 px,
P6's 128-203 px, and AI-TOD's 2-32 px objects meet anchors of their own size; a box that reaches
IoU 0.5 with no anchor still gets its best anchors (low-quality matches). The box loss is L1 on
the deltas, the class loss the focal loss, both per positive anchor, as mmdetection's RetinaNet.

The sections shared by every detector are documented in ``dfrdet_jax/base_config.py``;
``config.retinanet`` holds RetinaNet's own.
"""

import ml_collections

from dfrdet_jax import base_config


def get_config(arg: str = "synthetic,dfr"):
    dataset, variant, demo, smoke = base_config.parse_arg(arg, "configs/retinanet_r18.py")
    config = base_config.base_config("retinanet", dataset, variant)
    config.model.p6_source = "c5"  # P6: stride-2 conv on C5, as mmdetection's RetinaNet

    config.retinanet = ml_collections.ConfigDict()
    config.retinanet.octave_base_scale = 2.0  # smallest anchor of a level: 2x its stride
    config.retinanet.scales_per_octave = 3
    config.retinanet.aspect_ratios = (0.5, 1.0, 2.0)  # h / w
    config.retinanet.positive_iou = 0.5
    config.retinanet.negative_iou = 0.4
    config.retinanet.low_quality_matches = True
    config.retinanet.ignore_iof = 0.5  # anchors this much inside an ignore region are ignored
    config.retinanet.focal_alpha = 0.25
    config.retinanet.focal_gamma = 2.0
    config.retinanet.box_loss = "smooth_l1"  # or "giou" on the decoded boxes
    config.retinanet.smooth_l1_beta = 0.0  # 0: L1
    config.retinanet.box_weights = (1.0, 1.0, 1.0, 1.0)
    config.retinanet.assign_chunk_size = 16384
    # Match the anchors in the input pipeline (numpy, only the anchor x box pairs that overlap;
    # ops.host_targets) instead of in the train step over every box slot.
    config.retinanet.targets_in_pipeline = True

    if demo:
        base_config.make_demo(config)
    if smoke:
        base_config.make_smoke(config)
    return config
