"""The total loss of Eq. 11 on hand-worked parts: L = L_det + gamma * sum L_R + lambda * L_DFR."""

import numpy as np
import pytest

from dfrdet_jax.losses.total import total_loss

DETECTION = {"loss_cls": np.float32(1.0), "loss_box": np.float32(2.0), "num_pos": np.float32(7)}
# As binary layers sow them: a tuple of L_R per layer, anywhere in the collection.
SOWN = {
    "backbone": {"conv": {"reconstruction": (np.float32(3.0),)}},
    "reconstruction": (np.float32(5.0),),
}
# One 4x4 image of ones; a 2x2 box at the top left, a 2x2 ignore region at the bottom right.
IMAGES = np.ones((1, 4, 4, 3), np.float32)
BOXES = np.array([[[0, 0, 2, 2], [2, 2, 4, 4], [0, 0, 0, 0]]], np.float32)
VALID = np.array([[True, True, False]])
IGNORE = np.array([[False, True, False]])


def _total(reconstruction):
    return total_loss(
        DETECTION,
        SOWN,
        reconstruction,
        IMAGES,
        BOXES,
        VALID,
        IGNORE,
        reconstruction_weight=0.5,
        dfr_weight=2.0,
        dfr_mode="decoupled",
    )


def test_without_a_decoder_there_is_no_dfr_term():
    loss, metrics = _total(None)
    assert float(loss) == pytest.approx(3.0 + 0.5 * 8.0)  # L_det = 1 + 2; sum L_R = 3 + 5
    assert metrics.keys() == {*DETECTION, "loss_det", "loss_reconstruction", "loss"}
    assert float(metrics["loss_det"]) == 3.0 and float(metrics["loss_reconstruction"]) == 8.0
    assert float(metrics["num_pos"]) == 7.0  # not a loss_* entry: passed through, not summed
    assert DETECTION.keys() == {"loss_cls", "loss_box", "num_pos"}  # the input is not modified


def test_dfr_term_uses_the_boxes_and_leaves_out_ignore_regions():
    # A zero reconstruction misses X = 1 on the 4 foreground pixels x 3 channels (L1 = 12) and
    # is exact on the background; 4 of 16 pixels are ignored: L_DFR = 12 / (12 x 3) = 1/3.
    loss, metrics = _total(np.zeros_like(IMAGES))
    np.testing.assert_allclose(float(metrics["loss_dfr"]), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 3.0 + 0.5 * 8.0 + 2.0 / 3, rtol=1e-6)
    assert float(metrics["loss"]) == float(loss)
