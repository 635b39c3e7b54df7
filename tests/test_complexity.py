"""Size and OPs against hand counts; the decoder and batch size change nothing."""

import json

import flax.linen as nn
import pytest

from dfrdet_jax import complexity, layers, main


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
