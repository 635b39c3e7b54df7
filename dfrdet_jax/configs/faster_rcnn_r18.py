"""Faster R-CNN with a ResNet-18 + FPN (P2-P6) backbone: real, 1-bit, 1-bit with DFR or LSQ 4-bit.

Argument: comma-separated ``<dataset>,<variant>[,demo][,smoke]``, as ``configs/fcos_r18.py``:
  dataset  synthetic | aitod | tinyperson | dota2
  variant  real (32-bit) | bnn (1-bit baseline) | dfr (1-bit + DFR decoder, DFR-Det) |
           lsq4 (LSQ 4-bit weights and inputs in the same convs and units as bnn)
  demo     the small, fast setting for the synthetic data (narrow network, 128 px, 1,200 steps of
           AdamW, fewer proposals and RoIs)
  smoke    the demo shrunk to a one-minute run (P2-P4, widths 8-16, 64 px, 12 steps of SGD,
           fewer proposals and RoIs still)

Two stages, as mmdetection's faster_rcnn_r50_fpn with tiny-object anchors: the RPN has three
anchors per cell of 2x its level's stride (8 px on P2; mmdetection: 8x, 32 px), matched at IoU
0.7 / 0.3 with low-quality matches, 256 drawn per image, half positive at most; proposals as
mmdetection's RPNHead: the 2,000 anchors of highest objectness of each level (1,000 at
inference), NMS at 0.7 within each level, then the 1,000 best of all levels. The box head draws
512 RoIs per image (25 % positive at IoU 0.5, the ground truth added as proposals), pools 7 x 7
RoIAlign from the level their size picks (P2 for everything under 112 px), and runs two
1,024-wide FC layers (binary in 1-bit variants, as the paper binarizes "all convolution and FC
layers") before the real classifier and class-specific box regressor.

The sections shared by every detector are documented in ``dfrdet_jax/base_config.py``;
``config.faster_rcnn`` holds Faster R-CNN's own.
"""

import ml_collections

from dfrdet_jax import base_config


def get_config(arg: str = "synthetic,dfr"):
    dataset, variant, demo, smoke = base_config.parse_arg(arg, "configs/faster_rcnn_r18.py")
    config = base_config.base_config("faster_rcnn", dataset, variant)
    # P6: P5 max-pooled (kernel 1, stride 2; no parameters), as mmdetection's Faster R-CNN.
    config.model.p6_source = "maxpool"

    f = config.faster_rcnn = ml_collections.ConfigDict()
    f.rpn_octave_base_scale = 2.0  # anchor side: 2x the level's stride
    f.rpn_scales_per_octave = 1
    f.rpn_aspect_ratios = (0.5, 1.0, 2.0)  # h / w
    f.rpn_positive_iou = 0.7
    f.rpn_negative_iou = 0.3
    f.rpn_num_samples = 256  # anchors drawn per image
    f.rpn_positive_fraction = 0.5
    # Proposals, as mmdetection's faster_rcnn_r50_fpn (configs/_base_/models/): its
    # train_cfg.rpn_proposal (nms_pre=2000, max_per_img=1000) while training, its test_cfg.rpn
    # (nms_pre=1000, max_per_img=1000) at inference. nms_pre is per level (RPNHead: a top-k of
    # each level, then NMS within each level, then the best max_per_img of all levels): every
    # level keeps candidates of its own, neither P2's many anchors (where the tiny objects are)
    # nor a coarser level's higher scores crowding the others out.
    f.rpn_pre_nms_top_k_per_level_train = 2000
    f.rpn_post_nms_top_k_train = 1000  # proposals per image the RoIs are drawn from
    f.rpn_pre_nms_top_k_per_level_test = 1000
    f.rpn_post_nms_top_k_test = 1000  # proposals per image through the box head
    f.rpn_nms_iou = 0.7
    f.rpn_min_size = 0.0  # px; proposals must be larger on both sides
    f.roi_num_samples = 512  # RoIs drawn per image
    f.roi_positive_fraction = 0.25
    f.roi_positive_iou = 0.5
    f.roi_negative_iou = 0.5
    f.roi_output_size = 7
    f.roi_sampling_ratio = 2
    f.roi_canonical_level = 4  # level of a 224 px RoI (FPN's k0)
    f.fc_width = 1024
    f.smooth_l1_beta = 0.0  # 0: L1, as mmdetection
    f.assign_chunk_size = 16384
    # Match the RPN's anchors in the input pipeline (numpy, only the anchor x box pairs that
    # overlap; ops.host_targets) instead of in the train step over every box slot.
    f.targets_in_pipeline = True

    if demo:
        base_config.make_demo(config)
        f.rpn_pre_nms_top_k_per_level_train = 1000
        f.rpn_post_nms_top_k_train = 300
        f.rpn_pre_nms_top_k_per_level_test = 500
        f.rpn_post_nms_top_k_test = 300
        f.roi_num_samples = 128
        f.fc_width = 128
    if smoke:
        base_config.make_smoke(config)
        f.rpn_pre_nms_top_k_per_level_train = 200
        f.rpn_post_nms_top_k_train = 64
        f.rpn_pre_nms_top_k_per_level_test = 100
        f.rpn_post_nms_top_k_test = 64
        f.roi_num_samples = 32
        f.fc_width = 32
    return config
