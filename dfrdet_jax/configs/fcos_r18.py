"""FCOS with a ResNet-18 + FPN (P2-P6) backbone: real, 1-bit, 1-bit with DFR or LSQ 4-bit.

Argument: comma-separated ``<dataset>,<variant>[,demo][,smoke]``:
  dataset  synthetic | aitod | tinyperson | dota2
  variant  real (32-bit) | bnn (1-bit baseline) | dfr (1-bit + DFR decoder, DFR-Det) |
           lsq4 (LSQ 4-bit weights and inputs in the same convs and units as bnn)
  demo     a small, fast setting (narrow network, 128 px images, 1,200 steps of AdamW) that
           trains on 2 CPU cores in a few minutes; meant for the synthetic data.
  smoke    the demo shrunk further (P2-P4, widths 8-16, 64 px images, 12 steps of SGD): a
           whole run in about a minute, and the tests' detector; implies demo.

Examples::

  --config configs/fcos_r18.py:aitod,dfr          the paper's setting on AI-TOD
  --config configs/fcos_r18.py:synthetic,dfr,demo the README's quick run
  --config configs/fcos_r18.py:synthetic,dfr,smoke a check that everything runs

The sections shared by every detector (data, model, postprocess, loss, dfr, distill, optimizer,
train, eval) are documented in ``dfrdet_jax/base_config.py``; ``config.fcos`` holds FCOS's own.
"""

import ml_collections

from dfrdet_jax import base_config


def get_config(arg: str = "synthetic,dfr"):
    dataset, variant, demo, smoke = base_config.parse_arg(arg, "configs/fcos_r18.py")
    config = base_config.base_config("fcos", dataset, variant)
    config.model.p6_source = "p5"  # P6: stride-2 conv on the FPN's P5, as mmdetection's FCOS

    config.fcos = ml_collections.ConfigDict()
    # Max regression distance per level, px; P2..P6, each level ~4-8x its stride (tiny objects).
    config.fcos.regress_ranges = (
        (-1.0, 16.0),
        (16.0, 32.0),
        (32.0, 64.0),
        (64.0, 128.0),
        (128.0, 1e8),
    )
    config.fcos.center_sampling = True
    config.fcos.center_radius = 1.5
    config.fcos.focal_alpha = 0.25
    config.fcos.focal_gamma = 2.0
    config.fcos.assign_chunk_size = 4096
    # Assign the points' targets in the input pipeline (numpy, only the point x box pairs that
    # overlap; ops.host_targets) instead of in the train step over every box slot.
    config.fcos.targets_in_pipeline = True
    # Inference score of a (point, class) pair (models/heads/fcos.py, SCORE_MODES): 'mmdet' keeps
    # class score > config.postprocess.score_threshold and scores class x centerness (mmdetection,
    # the paper's codebase family); 'torchvision' thresholds and scores sqrt(class x centerness).
    config.fcos.score_mode = "mmdet"
    # ltrb distances from the regression tower (models/heads/fcos.py, BOX_ACTIVATIONS):
    # 'relu' (mmdetection's norm_on_bbox, torchvision) or 'exp' (the FCOS paper's; no dead units).
    config.fcos.box_activation = "relu"

    if demo:
        base_config.make_demo(config)
    if smoke:
        base_config.make_smoke(config)
        config.fcos.regress_ranges = ((-1.0, 16.0), (16.0, 32.0), (32.0, 1e8))  # P2-P4
    return config
