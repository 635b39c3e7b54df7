"""A config for whole training runs in tests: a tiny 1-bit detector on a small synthetic set.

Loaded by path (``--config tests/resume_config.py[:family]``), like any file in configs/; the
argument is the detector family, FCOS by default.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_fixtures import tiny_config  # noqa: E402


def get_config(arg=None):
    config = tiny_config("bnn", family=arg or "fcos")
    config.data.root = os.environ.get("DFRDET_TEST_DATA", config.data.root)
    config.data.image_size = 64
    config.data.max_boxes = 64
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 4
    config.data.synthetic.min_objects = 4
    config.data.synthetic.max_size = 24
    config.train.num_steps = 12
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.eval_every_steps = 1000  # only at the end
    config.eval.batch_size = 2
    config.postprocess.max_detections = 20
    config.postprocess.pre_nms_top_k = 100
    return config
