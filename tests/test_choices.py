"""The one error for a setting outside its choices: its wording, and that the entry points a
user reaches first (config files, modes, layers, losses, the distributed runtime) raise it."""

import ml_collections
import numpy as np
import pytest

from dfrdet_jax import configs, distributed, main
from dfrdet_jax.choices import check_choice, unknown_choice
from dfrdet_jax.layers import conv
from dfrdet_jax.losses import dfr


def test_message_names_the_setting_the_value_and_every_choice_in_order():
    error = unknown_choice("config.model.norm", "layer", ("batch", "group", "none"), "GN: 32")
    assert str(error) == (
        "Unknown config.model.norm 'layer'; valid choices: ['batch', 'group', 'none'] (GN: 32)"
    )
    assert str(unknown_choice("ResNet depth", 50, [18, 34])) == (
        "Unknown ResNet depth 50; valid choices: [18, 34]"
    )


def test_check_choice_passes_a_valid_value_and_raises_the_same_error_otherwise():
    check_choice("grid", "recipes", {"comparison": 0, "recipes": 1})  # a dict's keys count
    with pytest.raises(ValueError, match=r"^Unknown grid 'big'; valid choices: \['comparison'"):
        check_choice("grid", "big", {"comparison": 0, "recipes": 1})


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: configs.path("fcos_r50"),
            r"Unknown config 'fcos_r50'; valid choices: \['fcos_r18'",
        ),
        (lambda: main.run("fit", None, "/tmp"), r"Unknown mode 'fit'; valid choices: \["),
        (
            lambda: distributed.initialize(
                ml_collections.ConfigDict({"distributed": {"mode": "maybe"}})
            ),
            r"Unknown config.distributed.mode 'maybe'; valid choices: \['auto', 'on', 'off'\]",
        ),
        (
            lambda: dfr.dfr_loss(
                np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4)), mode="all"
            ),
            r"Unknown dfr_loss mode 'all'; valid choices: \['decoupled'",
        ),
        (
            lambda: conv.explicit_padding("FULL", (8, 8), (3, 3), (1, 1), (1, 1)),
            r"Unknown padding 'FULL'; valid choices: \['SAME', 'VALID'\] \(or an int",
        ),
    ],
)
def test_entry_points_raise_the_one_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
