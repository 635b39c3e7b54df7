"""Size and OPs against hand counts; the decoder and batch size change nothing."""

import json

import flax.linen as nn
import pytest

from dfrdet_jax import complexity, layers, main
from dfrdet_jax.models import registry

# (size MB, G OPs) of each R18 detector at the paper's setting (800 x 800 px, 8 classes): the
# README's table (dfr is bnn's: test_detector_variants_and_the_decoder_is_not_counted).
PAPER_SETTING = {
    ("fcos", "real"): (76.51, 308.86),
    ("fcos", "bnn"): (3.64, 8.13),
    ("fcos", "lsq4"): (10.73, 41.55),
    ("retinanet", "real"): (79.74, 320.63),
    ("retinanet", "bnn"): (4.85, 19.81),
    ("retinanet", "lsq4"): (12.16, 53.24),
    ("faster_rcnn", "real"): (113.38, 102.91),
    ("faster_rcnn", "bnn"): (4.76, 5.19),
    ("faster_rcnn", "lsq4"): (15.28, 16.04),
}


class Mixed(nn.Module):
    """A real conv, a 1-bit conv, a 1-bit kernel on a real input, a dense layer called twice."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="real")(x)  # 8x8x3 -> 8x8x4
        x = layers.BinaryConv(6, (3, 3), strides=2, name="binary")(x)  # -> 4x4x6
        x = layers.BinaryConv(5, (1, 1), input_quantizer=None, name="real_input")(x)  # -> 4x4x5
        dense = nn.Dense(5, name="shared")
        return dense(dense(x))


def test_counts_match_a_hand_count():
    got = complexity.count(Mixed(), (8, 8))
    # Parameters: real conv 3*3*3*4 + 4 bias; alphas 6 + 5; dense 5*5 + 5. Binary kernels:
    # 3*3*4*6 and 1*1*6*5.
    assert got.real_params == 112 + 6 + 5 + 30
    assert got.binary_params == 216 + 30
    # MACs = output elements x fan-in. The 1-bit kernel on a real input counts as real; the
    # dense layer counts once per call.
    assert got.binary_macs == 4 * 4 * 6 * (3 * 3 * 4)
    assert got.real_macs == 8 * 8 * 4 * 27 + 4 * 4 * 5 * 6 + 2 * (4 * 4 * 5 * 5)
    assert got.size_mb == pytest.approx((32 * 153 + 246) / 8 / 1e6)
    assert got.ops == pytest.approx(got.real_macs + 3456 / 64)


def test_a_transposed_conv_counts_its_input_pixels_times_its_kernel():
    """A 2x2 stride-2 transposed conv writes each output pixel from one tap: 5x5 input pixels x
    2*2*3*4 weights, not the 10x10x4 outputs x a conv's fan-in (four times as many)."""
    got = complexity.count(nn.ConvTranspose(4, (2, 2), strides=(2, 2), use_bias=False), (5, 5))
    assert got.real_macs == 5 * 5 * (2 * 2 * 3 * 4)


@pytest.mark.parametrize("family", ["fcos", "retinanet", "faster_rcnn"])
def test_detector_variants_and_the_decoder_is_not_counted(smoke_config, tmp_path, family):
    counts = {}
    for variant in ("real", "bnn", "dfr"):
        config = smoke_config(variant, family=family)
        counts[variant] = main.run("complexity", config, str(tmp_path / variant))
    assert counts["real"]["binary_params"] == 0 and counts["real"]["binary_macs_g"] == 0
    # At these tiny widths RetinaNet's real prediction convs (9 anchors x classes outputs) weigh
    # relatively more than at full width.
    share = {"fcos": 10, "retinanet": 5, "faster_rcnn": 10}[family]
    assert counts["bnn"]["binary_params"] > share * counts["bnn"]["real_params"]
    # DFR's decoder is training-only: the deployed 1-bit DFR-Det is the 1-bit baseline's size.
    for key in ("size_mb", "ops_g", "real_params", "binary_params"):
        assert counts["dfr"][key] == counts["bnn"][key]
    # The same convolutions: binarizing moves MACs from real to binary, adding or removing none.
    real, bnn = counts["real"], counts["bnn"]
    assert real["real_macs_g"] == pytest.approx(bnn["real_macs_g"] + bnn["binary_macs_g"])
    assert counts["bnn"]["size_mb"] < counts["real"]["size_mb"] / share
    with open(tmp_path / "dfr" / "complexity.json") as f:
        assert json.load(f) == counts["dfr"]


def test_the_box_head_counts_every_proposal(smoke_config):
    # The box head's leading axis holds the RoIs, not the batch: its MACs scale with them.
    counts = {}
    for proposals in (32, 48):
        config = smoke_config("real", family="faster_rcnn")
        config.faster_rcnn.rpn_post_nms_top_k_test = proposals
        model = registry.build_model(config, num_classes=3)
        counts[proposals] = complexity.count(model, (64, 64), train=False)
    f, width = config.faster_rcnn, config.model.fpn_width
    # Per RoI: fc0 on the 7 x 7 x width RoIAlign map, fc1, 3 + 1 logits, 3 x 4 deltas.
    per_roi = f.fc_width * (f.roi_output_size**2 * width + f.fc_width + 4 + 12)
    assert counts[48].real_macs - counts[32].real_macs == 16 * per_roi
    assert counts[48].real_params == counts[32].real_params


@pytest.mark.parametrize(("family", "variant"), list(PAPER_SETTING))
def test_counts_at_the_papers_setting(load_config, family, variant):
    # Faster R-CNN: 1,000 proposals through the box head. P6: a conv on P5 (FCOS), a conv on C5
    # (RetinaNet), P5 max-pooled (Faster R-CNN).
    config = load_config(f"synthetic,{variant}", family)
    got = complexity.count(registry.build_model(config, num_classes=8), (800, 800), train=False)
    assert (round(got.size_mb, 2), round(got.ops / 1e9, 2)) == PAPER_SETTING[family, variant]
