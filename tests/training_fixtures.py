"""Tiny detector configs and hand-made batches shared by the training tests and their workers."""

import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(arg, family="fcos"):
    """get_config(arg) of configs/<family>_r18.py."""
    name = f"{family}_r18"
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(variant, batch_size=2, family="fcos"):
    """The demo config of ``variant`` narrowed to P2-P4, no warm-up, for 64 px images."""
    config = load_config(f"synthetic,{variant},demo", family)
    config.model.backbone_width = 8
    config.model.fpn_width = 16
    config.model.head_convs = 1
    config.model.max_level = 4  # P2-P4: a smaller program, compiled faster
    if family == "fcos":
        config.fcos.regress_ranges = ((-1.0, 16.0), (16.0, 32.0), (32.0, 1e8))
    if family == "faster_rcnn":
        config.faster_rcnn.rpn_pre_nms_top_k = 200
        config.faster_rcnn.rpn_post_nms_top_k = 64
        config.faster_rcnn.roi_num_samples = 32
        config.faster_rcnn.fc_width = 32
    config.dfr.decoder_width = 8
    config.train.batch_size = batch_size
    config.optimizer.base_batch_size = batch_size
    config.optimizer.name = "sgd"
    config.optimizer.warmup_steps = 0
    config.optimizer.base_learning_rate = 0.01
    return config


def make_batch(seed=0, batch_size=2, size=64, num_boxes=8, max_boxes=12):
    """Bright squares of 3 classes on a dark noisy background, in the standard batch format."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (batch_size, size, size, 3)).astype(np.uint8)
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    labels = np.full((batch_size, max_boxes), -1, np.int32)
    for b in range(batch_size):
        for i in range(num_boxes):
            s = int(rng.integers(4, 20))
            x, y = rng.integers(0, size - s, 2)
            boxes[b, i] = [x, y, x + s, y + s]
            labels[b, i] = i % 3
            image[b, y : y + s, x : x + s, i % 3] = 250
    valid = labels >= 0
    return {
        "image": image,
        "boxes": boxes,
        "labels": labels,
        "box_valid": valid,
        "ignore": np.zeros_like(valid),
        "image_id": np.arange(batch_size, dtype=np.int32) + seed * batch_size,
        "image_hw": np.full((batch_size, 2), size, np.int32),
        "scale": np.ones(batch_size, np.float32),
    }
