"""What every detector config shares: data set, variant, backbone, losses, optimizer, training.

A config file in ``configs/`` parses its argument with ``parse_arg``, starts from
``base_config(family, dataset, variant)``, adds its family's section (``config.fcos``,
``config.retinanet``), for ``demo`` calls ``make_demo`` and then, for ``smoke``, ``make_smoke``
(each followed by its family's part of that setting). The paper's settings are the
defaults (Sec. 4.1): SGD 0.9, weight decay 1e-4, lr 0.005 at batch 2 scaled linearly, 12 epochs
with x0.1 at 8 and 11, gamma = 1e-4, lambda = 0.04, score threshold 0.05, NMS IoU 0.5.
"""

from __future__ import annotations

import ml_collections

from dfrdet_jax import data
from dfrdet_jax.choices import check_choice

VARIANTS = ("real", "bnn", "dfr", "lsq4")
SETTINGS = ("demo", "smoke")  # optional tokens of a config argument


def parse_arg(arg: str, config_file: str) -> tuple[str, str, bool, bool]:
    """'synthetic,dfr[,demo][,smoke]' -> (dataset, variant, demo, smoke).

    ``smoke`` implies ``demo``: the smoke setting narrows the demo's. Anything else is a clear
    error.
    """
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    smoke = "smoke" in tokens
    demo = smoke or "demo" in tokens
    tokens = [t for t in tokens if t not in SETTINGS]
    datasets = data.source_names()
    usage = f"{config_file} takes '<dataset>,<variant>[,demo][,smoke]'"
    if len(tokens) != 2:
        raise ValueError(
            f"{usage} with dataset in {list(datasets)} and variant in {list(VARIANTS)}; got {arg!r}"
        )
    given = f"{usage}; got {arg!r}"
    if tokens[0] in VARIANTS and tokens[1] in datasets:
        raise ValueError(f"{given}: the data set comes first, '{tokens[1]},{tokens[0]}'")
    check_choice("data set", tokens[0], datasets, given)
    check_choice("variant", tokens[1], VARIANTS, given)
    if demo and tokens[0] != "synthetic":
        raise ValueError(
            f"{config_file}: 'demo' and 'smoke' size a run for the synthetic data set (its 128 px "
            f"images, a narrow network, minutes on a CPU); for {tokens[0]} leave them out and "
            f"override fields instead, e.g. --config.train.num_steps=1000; got {arg!r}"
        )
    return tokens[0], tokens[1], demo, smoke


def base_config(family: str, dataset: str, variant: str) -> ml_collections.ConfigDict:
    """Every section but the family's own, for ``variant`` ('real', 'bnn', 'dfr' or 'lsq4')."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.variant = variant

    config.data = data.default_data_config(dataset)

    config.model = ml_collections.ConfigDict()
    config.model.name = family
    config.model.depth = 18
    config.model.backbone_width = 64
    config.model.fpn_width = 256
    config.model.min_level = 2
    config.model.max_level = 6
    # config.model.p6_source, how the FPN builds P6 ('p5', 'c5' or 'maxpool'; models/fpn.py),
    # is set by each family's config file to that family's convention.
    config.model.head_convs = 4
    # Channels of the head's conv towers (FCOS's and RetinaNet's towers, Faster R-CNN's RPN
    # conv); 0: fpn_width. mmdetection's feat_channels. A wider 1-bit tower costs binary OPs
    # (1/64 of real ones, as the paper counts) and its first unit a real 1x1 shortcut conv.
    config.model.head_width = 0
    # A GroupNorm on each FPN level before the head (FCOS's and RetinaNet's towers, Faster
    # R-CNN's RPN and RoIAlign). A 1-bit head on a real FPN needs it: the levels' scale would
    # drown its first unit's binary branch.
    config.model.head_input_norm = False
    # The head's towers (FCOS's, RetinaNet's, Faster R-CNN's RPN conv) with a GroupNorm of their
    # own per pyramid level (the convs stay shared), as low-bit detectors do (AQD): one scale
    # and bias per channel need not fit every level's balance of a 1-bit unit's binary branch
    # and its shortcut.
    config.model.head_level_norms = False
    config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters and optimizer state
    # Starting weights of a new run (dfrdet_jax/warm_start.py): a torchvision-layout ResNet
    # state dict for the backbone (.safetensors / .npz), and/or another run's workdir whose
    # "latest" or "best" checkpoint gives every tensor whose path and shape match.
    config.model.pretrained = ""
    config.init_from = ""
    config.init_from_checkpoint = "latest"
    # 1-bit settings (paper, Sec. 4.1): every conv of these parts is binary except the stem, the
    # downsampling shortcuts and the head's prediction convs. lsq4 (the paper's LSQ 4-bit
    # baseline) quantizes the same convs, in the same units, to 4-bit weights and inputs.
    config.model.binary_parts = () if variant == "real" else ("backbone", "neck", "head")
    config.model.binary = ml_collections.ConfigDict(
        dict(
            input_quantizer="approx",
            weight_quantizer="clipped",
            scale="learned",
            pad_value=0.0,
            activation="prelu",
            learnable_bias=True,
            bits=4 if variant == "lsq4" else 1,  # 1: binary; 2-8: LSQ (the quantizers unused)
        )
    )

    # Inference: the best pre_nms_top_k (location, class) pairs above score_threshold, then
    # class-wise NMS, at most max_detections per image (AI-TOD scores up to 1,500). FCOS applies
    # the threshold to the class score, as mmdetection, unless config.fcos.score_mode says
    # 'torchvision' (to sqrt(class x centerness)).
    config.postprocess = ml_collections.ConfigDict()
    config.postprocess.score_threshold = 0.05
    config.postprocess.nms_iou_threshold = 0.5
    config.postprocess.max_detections = 1500
    config.postprocess.pre_nms_top_k = 5000

    # The predict mode (dfrdet_jax/predict.py) on images of any size. 'tiles': tiles of tile_size
    # px (0: data.image_size, the scale the model was trained at) overlapping by tile_overlap
    # (a fraction of the tile), merged across tiles (dfrdet_jax/sliced.py) with NMS at
    # merge_iou (<= 0: postprocess.nms_iou_threshold); 'whole': the image resized to
    # data.image_size, with a warning when that shrinks it more than max_downscale times.
    # Drawings of images over max_drawn_side px are scaled down to it.
    config.predict = ml_collections.ConfigDict()
    config.predict.mode = "tiles"
    config.predict.tile_size = 0
    config.predict.tile_overlap = 0.25
    config.predict.merge_iou = 0.0
    config.predict.max_downscale = 2.0
    config.predict.max_drawn_side = 4096

    # The viz mode (dfrdet_jax/figures.py): pictures of the first num_images images of
    # eval.split (outcomes at IoU iou for scores >= min_score, saliency of FPN level P<level>
    # beside that of compare_workdir's checkpoint when given, the DFR reconstruction), PR curves
    # per size class and training curves.
    config.viz = ml_collections.ConfigDict()
    config.viz.num_images = 4
    config.viz.iou = 0.5
    config.viz.min_score = 0.3
    config.viz.level = 2
    config.viz.compare_workdir = ""

    # L = L_det + gamma * sum L_R + lambda * L_DFR (paper, Eq. 11).
    config.loss = ml_collections.ConfigDict()
    # gamma. L_R is a 1-bit term: no layer of the real and lsq4 variants sows it.
    config.loss.reconstruction_weight = 0.0 if variant in ("real", "lsq4") else 1e-4
    config.loss.dfr_weight = 0.04 if variant == "dfr" else 0.0  # lambda
    config.dfr = ml_collections.ConfigDict()
    # FPN levels decoded: any subset of the pyramid (Table 1), all merged on the stride-4 grid.
    config.dfr.levels = (2, 3, 4) if variant == "dfr" else ()
    # L_DFR (losses/dfr.py): "decoupled" is Eq. 10; "full", "foreground", "background" are Table
    # 1's; "zero" (a blank image everywhere) is a control without the image or the boxes.
    config.dfr.mode = "decoupled"
    config.dfr.decoder_width = 64
    config.dfr.decoder_blocks = 2
    # The decoder's own base learning rate (0: the run's optimizer.base_learning_rate), scaled
    # to the batch and following the run's schedule like it. The decoder is real-valued and has
    # no normalisation: at the lr that 1-bit latent weights need, its residual block can blow
    # up in one step (RESULTS.md, "A steady decoder").
    config.dfr.base_learning_rate = 0.0
    # Distillation from a frozen real teacher (dfrdet_jax/distill.py): the workdir of a trained
    # run of this config's real variant; L += feature_weight * FPN imitation on ``levels``
    # (empty: all) + logit_weight * the KL of the per-class scores (dense heads only).
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""
    config.distill.teacher_checkpoint = "best"
    config.distill.feature_weight = 0.0
    config.distill.logit_weight = 0.0
    config.distill.levels = ()

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # the paper's; or "adamw"
    config.optimizer.base_learning_rate = 0.005  # at base_batch_size, scaled linearly
    config.optimizer.base_batch_size = 2
    config.optimizer.momentum = 0.9  # sgd
    config.optimizer.adam_betas = (0.9, 0.999)  # adamw
    config.optimizer.weight_decay = 1e-4
    # False: no decay on the 1-bit layers' latent kernels (LSQ's k-bit kernels keep theirs).
    config.optimizer.latent_weight_decay = True
    config.optimizer.warmup_steps = 500
    config.optimizer.warmup_factor = 1.0 / 3
    config.optimizer.decay_epochs = (8, 11)
    config.optimizer.decay_factor = 0.1
    config.optimizer.grad_clip_norm = 35.0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 2  # global, over all devices
    config.train.num_epochs = 12
    config.train.num_steps = -1  # > 0 overrides num_epochs
    config.train.log_every_steps = 50
    # Warn when a logged loss part or the gradient norm exceeds this many times its running
    # level (run_utils.SpikeWatch); 0: off.
    config.train.spike_factor = 10.0
    config.train.eval_every_steps = -1  # -1: at the end of every epoch
    config.train.checkpoint_every_steps = 1000
    config.train.keep_checkpoints = 3
    config.train.num_workers = 0  # grain decoding processes (0: in the training process)
    config.train.prefetch_batches = 2  # batches read ahead and copied to the devices
    # glibc's malloc keeps freed memory for reuse (dfrdet_jax/host_memory.py), so XLA:CPU's
    # temporaries are not faulted in again at every step; process-wide, from the run's start.
    config.train.retain_freed_host_memory = True
    config.train.profile_num_steps = 0  # > 0: jax.profiler trace of these steps in workdir/profile
    config.train.profile_start_step = 10
    # Multi-process start-up, see dfrdet_jax/distributed.py ('auto': from the environment).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.mode = "auto"
    config.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 2
    config.eval.split = "val"
    config.eval.checkpoint = "latest"  # --mode eval/predict/export: "latest" or "best" (by metric)
    source = data.get_source(dataset)
    config.eval.protocol = source.protocol  # dfrdet_jax.evaluation protocol
    # checkpoints_best keeps the checkpoint with the highest value of this metric.
    config.eval.best_metric = source.best_metric
    return config


def make_demo(config: ml_collections.ConfigDict) -> None:
    """Narrow network, 128 px synthetic images, 1,200 steps of batch 8 with AdamW: a few minutes
    on 2 CPU cores (in place)."""
    config.data.synthetic.num_train = 512
    config.data.synthetic.min_objects = 20  # denser scenes: more positives per step
    config.model.backbone_width = 16
    config.model.fpn_width = 32
    config.model.head_convs = 2
    config.dfr.decoder_width = 16
    config.dfr.decoder_blocks = 1
    config.postprocess.max_detections = 300
    config.postprocess.pre_nms_top_k = 1000
    # From scratch in 1,200 steps AdamW at lr 1e-3 learns far faster than the paper's SGD (which
    # starts from ImageNet weights): on the synthetic set FCOS reaches 48.5 AP real and 17.7 AP
    # 1-bit instead of 37.9 and 2.5 (RESULTS.md, "From scratch, all three detectors").
    config.optimizer.name = "adamw"
    config.optimizer.base_learning_rate = 2.5e-4  # at batch 2: lr 1e-3 at batch 8
    config.optimizer.base_batch_size = 2
    config.optimizer.warmup_steps = 100
    config.train.batch_size = 8
    config.train.num_steps = 1200
    config.train.log_every_steps = 50
    config.train.eval_every_steps = 600
    config.train.checkpoint_every_steps = 300
    config.eval.batch_size = 8


def make_smoke(config: ml_collections.ConfigDict) -> None:
    """The demo (call ``make_demo`` first) shrunk to a whole run in about a minute on 2 CPU
    cores: widths 8-16, one head conv, P2-P4, 64 px images, 12 steps of batch 2 with plain SGD,
    one evaluation at the end on 4 images. The tests' detector (in place)."""
    config.data.image_size = 64
    config.data.max_boxes = 64
    config.data.min_box_slots = 64  # one compiled step: 12 steps do not pay for a second
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 4
    config.data.synthetic.num_test = 4
    config.data.synthetic.min_objects = 4
    config.data.synthetic.max_size = 24
    config.model.backbone_width = 8
    config.model.fpn_width = 16
    config.model.head_convs = 1
    config.model.max_level = 4  # P2-P4: a smaller program, compiled faster
    config.dfr.decoder_width = 8
    config.postprocess.max_detections = 20
    config.postprocess.pre_nms_top_k = 100
    config.optimizer.name = "sgd"
    config.optimizer.base_learning_rate = 0.01
    config.optimizer.base_batch_size = 2
    config.optimizer.warmup_steps = 0
    config.train.batch_size = 2
    config.train.num_steps = 12
    config.eval.batch_size = 2
