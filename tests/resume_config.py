"""A config for whole training runs in tests: the smoke config of a 1-bit detector.

Loaded by path (``--config tests/resume_config.py[:family]``), like any file in configs/; the
argument is the detector family, FCOS by default. ``DFRDET_TEST_DATA`` points the synthetic data
at a test's own folder.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import smoke  # noqa: E402


def get_config(arg=None):
    config = smoke.smoke_config("bnn", family=arg or "fcos")
    config.data.root = os.environ.get("DFRDET_TEST_DATA", config.data.root)
    config.train.log_every_steps = 1  # every step's loss, compared between runs
    config.train.checkpoint_every_steps = 2  # places to interrupt and resume from
    config.data.min_box_slots = 16  # bucketed box slots: batches of 16 and 64 slots
    return config
