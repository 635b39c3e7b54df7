"""The smoke config and hand-made batches as plain functions: conftest.py hands them to the tests
as fixtures, and the scripts tests run as subprocesses (resume_config.py,
multiprocess_worker.py), which cannot take fixtures, import them from here."""

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


def smoke_config(variant, family="fcos", batch_size=2):
    """configs/<family>_r18.py:synthetic,<variant>,smoke at global batch ``batch_size``, with
    the smoke learning rate (0.01) at that batch."""
    config = load_config(f"synthetic,{variant},smoke", family)
    config.train.batch_size = batch_size
    config.optimizer.base_batch_size = batch_size
    return config


def make_batch(seed=0, batch_size=2, size=64, num_boxes=8, max_boxes=12):
    """Bright squares of 3 classes on a dark noisy background, in the standard batch format;
    ``num_boxes=0`` gives images without any box (all ``box_valid`` False)."""
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
