"""The train step: every variant lowers its loss, compiles once; schedule and config checks."""

import functools
import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dfrdet_jax import train
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(arg):
    spec = importlib.util.spec_from_file_location("fcos_r18", ROOT / "configs" / "fcos_r18.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(variant):
    config = load_config(f"synthetic,{variant},demo")
    config.model.backbone_width = 8
    config.model.fpn_width = 16
    config.model.head_convs = 1
    config.dfr.decoder_width = 8
    config.train.batch_size = 2
    config.optimizer.base_batch_size = 2
    config.optimizer.warmup_steps = 0
    config.optimizer.base_learning_rate = 0.01
    return config


def make_batch(seed=0, size=64, num_boxes=8):
    """Bright squares of 3 classes on a dark noisy background, padded to 12 boxes."""
    rng = np.random.default_rng(seed)
    batch_size, n = 2, 12
    image = rng.integers(0, 60, (batch_size, size, size, 3)).astype(np.uint8)
    boxes = np.zeros((batch_size, n, 4), np.float32)
    labels = np.full((batch_size, n), -1, np.int32)
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
        "image_id": np.arange(batch_size),
        "image_hw": np.full((batch_size, 2), size, np.int32),
        "scale": np.ones(batch_size, np.float32),
    }


@pytest.mark.parametrize("variant", ["real", "bnn", "dfr"])
def test_a_few_steps_lower_the_loss_and_compile_once(variant):
    config = tiny_config(variant)
    model = registry.build_model(config, num_classes=3)
    total_steps = 12
    state = train.create_train_state(config, model, jax.random.key(0), (64, 64), total_steps)
    step = jax.jit(
        functools.partial(
            train.train_step,
            model=model,
            config=config,
            learning_rate=train.make_learning_rate(config, total_steps),
        )
    )
    batch = make_batch()
    losses = []
    for _ in range(total_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1  # pylint: disable=protected-access
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert ("loss_dfr" in metrics) == (variant == "dfr")
    assert (float(metrics["loss_reconstruction"]) > 0) == (variant != "real")
    assert int(state.step) == total_steps


def test_learning_rate_schedule_warmup_and_step_decay():
    config = load_config("synthetic,dfr")
    config.train.batch_size = 8  # 4x the paper's batch 2: lr 0.02
    config.optimizer.warmup_steps = 100
    schedule = train.make_learning_rate(config, total_steps=1200)  # 100 steps per "epoch"
    lr = 0.005 * 8 / 2
    np.testing.assert_allclose(float(schedule(0)), lr / 3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), lr / 3 + (lr - lr / 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(799)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(800)), lr * 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1100)), lr * 0.01, rtol=1e-6)


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": np.ones((3, 3, 2, 2)), "alpha": np.ones(2), "bias": np.ones(2)}}
    mask = train._decay_mask(params)  # pylint: disable=protected-access
    assert mask == {"conv": {"kernel": True, "alpha": False, "bias": False}}


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "yolo", r"Unknown config.model.name 'yolo'.*fcos"),
        ("model.binary_parts", ("backbone", "decoder"), r"binary_parts \['decoder'\]"),
        ("model.binary.scale", "per_tensor", r"Unknown scale 'per_tensor'"),
        ("model.binary.input_quantizer", "tanh", r"Unknown binary quantizer 'tanh'"),
        ("model.dtype", "float16", r"Unknown config.model.dtype"),
        ("dfr.mode", "both", r"Unknown config.dfr.mode 'both'"),
        ("dfr.levels", (2, 7), r"config.dfr.levels \[7\]"),
    ],
)
def test_config_errors_are_clear(field, value, message):
    config = load_config("synthetic,dfr")
    parent, name = field.rsplit(".", 1) if "." in field else ("", field)
    node = config
    for part in parent.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=message):
        registry.validate_config(config)


def test_config_argument_errors():
    with pytest.raises(ValueError, match=r"dataset in .*synthetic.*variant in .*real"):
        load_config("synthetic,xnor")
    config = load_config("aitod,bnn")
    assert config.loss.dfr_weight == 0 and config.model.binary_parts
    assert load_config("aitod,real").model.binary_parts == ()


def test_config_typo_on_the_command_line_is_an_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfrdet_jax.main",
            "--config",
            "configs/fcos_r18.py:synthetic,dfr",
            "--config.optimizer.base_learnign_rate=0.1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "base_learnign_rate" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_batch_must_divide_over_devices(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    train.check_batch_divides(8, "config.train.batch_size")
    with pytest.raises(
        ValueError, match=r"config.train.batch_size=6 does not divide over 4 devices"
    ):
        train.check_batch_divides(6, "config.train.batch_size")
