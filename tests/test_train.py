"""The train step: every variant lowers its loss, compiles once and learns from images without
boxes; schedule and config checks."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dfrdet_jax import base_config, optimizers, run_utils, sharding, steps
from dfrdet_jax.models import detectors, registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


# 68 px is no multiple of P6's stride 64 (as AI-TOD's 800 px): levels are ceil-sized. The 1-bit
# baseline's step is the DFR row's without the decoder (test_dfr_at_lambda_zero_... below).
@pytest.mark.parametrize(
    ("family", "variant", "size"),
    [
        ("fcos", "real", 64),  # the quick run's (-m "not slow") one compiled train step
        *(
            pytest.param(*row, marks=pytest.mark.slow)
            for row in [
                ("fcos", "dfr", 68),
                ("retinanet", "real", 64),
                ("retinanet", "dfr", 68),
                ("faster_rcnn", "real", 64),
                ("faster_rcnn", "dfr", 68),
            ]
        ),
    ],
)
def test_a_few_steps_lower_the_loss_then_images_without_boxes_still_train(
    smoke_config, make_batch, family, variant, size
):
    config = smoke_config(variant, family=family)
    config.optimizer.weight_decay = 0.0  # so that only gradients can move the parameters
    model = registry.build_model(config, num_classes=3)
    total_steps = 12
    state = steps.create_train_state(config, model, jax.random.key(0), (size, size), total_steps)
    step = jax.jit(steps.make_train_step(config, model, total_steps))
    batch = make_batch(size=size)
    losses = []
    for _ in range(total_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    assert ("loss_dfr" in metrics) == (variant == "dfr")
    assert (float(metrics["loss_reconstruction"]) > 0) == (variant != "real")
    assert int(state.step) == total_steps

    # Empty DOTA tiles are common: no positive anywhere, only background to learn, through the
    # same compiled step (the boxes are padded slots, all invalid).
    empty = make_batch(size=size, num_boxes=0)
    assert not empty["box_valid"].any()
    new_state, metrics = step(state, empty)
    assert step._cache_size() == 1  # pylint: disable=protected-access
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["grad_norm"] > 0  # finite (above): every gradient is finite
    # Box losses and positive counts (loss_box, loss_rpn_box, num_roi_positive, ...) are 0.
    assert all(v == 0 for k, v in metrics.items() if "box" in k or "positive" in k), metrics
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new_state.params)
    assert any(jax.tree.leaves(changed))


def test_learning_rate_schedule_warmup_and_step_decay(load_config):
    config = load_config("synthetic,dfr")
    config.train.batch_size = 8  # 4x the paper's batch 2: lr 0.02
    config.optimizer.warmup_steps = 100
    schedule = optimizers.make_learning_rate(config, total_steps=1200)  # 100 steps per "epoch"
    lr = 0.005 * 8 / 2
    np.testing.assert_allclose(float(schedule(0)), lr / 3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), lr / 3 + (lr - lr / 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(799)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(800)), lr * 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1100)), lr * 0.01, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_first_optimizer_step_by_hand(load_config, name):
    config = load_config("synthetic,real")
    config.optimizer.name = name
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 0.0
    lr, wd = optimizers.global_learning_rate(config), config.optimizer.weight_decay
    params = {"kernel": np.array([[0.5, -2.0]]), "bias": np.array([1.0, 3.0])}
    grads = {"kernel": np.array([[0.1, 0.3]]), "bias": np.array([-0.2, 0.0])}
    tx = optimizers.make_optimizer(config, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    if name == "sgd":  # coupled decay, first momentum step = the gradient
        expected = {"kernel": -lr * (grads["kernel"] + wd * params["kernel"])}
        expected["bias"] = -lr * grads["bias"]
    else:  # Adam's first step is sign(g) (0 for g = 0); decoupled decay on kernels only
        expected = {"kernel": -lr * (np.sign(grads["kernel"]) + wd * params["kernel"])}
        expected["bias"] = -lr * np.sign(grads["bias"])
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(updates[key]), value, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("latent_weight_decay", [True, False])
def test_latent_weight_decay_switch(smoke_config, latent_weight_decay):
    """With latent_weight_decay False the 1-bit kernels take no decay; real kernels still do."""
    config = smoke_config("bnn")
    config.optimizer.latent_weight_decay = latent_weight_decay
    config.optimizer.grad_clip_norm = 0.0
    model = registry.build_model(config, num_classes=8)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 10)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = state.tx.update(zeros, state.opt_state, state.params)
    moved = {
        "/".join(path): bool(np.any(np.asarray(u) != 0))
        for path, u in flatten_dict(updates).items()
    }
    binary = "backbone/stage2_block1/unit1/conv/kernel"  # a 1-bit conv's latent weights
    real = "backbone/stem_conv/kernel"
    assert moved[real] and moved[binary] == latent_weight_decay
    assert not moved["backbone/stage2_block1/unit1/conv/alpha"]


@pytest.mark.slow
def test_dfr_at_lambda_zero_trains_the_detector_exactly_as_bnn(smoke_config, make_batch):
    """The DFR variant differs from the 1-bit baseline only through lambda * L_DFR: with lambda
    0 its detector (every parameter but the decoder's) is bit-identical to bnn's after a few
    steps, so the README's DFR - bnn and blank-image comparisons measure that loss alone."""
    trained = {}
    for variant in ("bnn", "dfr"):
        config = smoke_config(variant)
        config.loss.dfr_weight = 0.0
        model = registry.build_model(config, num_classes=3)
        state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 10)
        train_step = jax.jit(steps.make_train_step(config, model, total_steps=10))
        for seed in range(2):
            state, metrics = train_step(state, make_batch(seed=seed))
        trained[variant] = flatten_dict(jax.device_get(state.params), sep="/"), metrics
    (bnn, bnn_metrics), (dfr, dfr_metrics) = trained["bnn"], trained["dfr"]
    assert any(path.startswith(detectors.DECODER + "/") for path in dfr)  # it did run
    assert set(bnn) == {p for p in dfr if not p.startswith(detectors.DECODER + "/")}
    assert float(dfr_metrics["loss_dfr"]) > 0  # computed, weighted by 0
    for path, value in bnn.items():
        np.testing.assert_array_equal(dfr[path], value, err_msg=path)
    for name in ("loss_det", "loss_reconstruction", "grad_norm"):
        assert float(dfr_metrics[name]) == float(bnn_metrics[name]), name


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decoder_learning_rate_scales_only_the_decoders_updates(smoke_config, name):
    """dfr.base_learning_rate = base / 4: the decoder's first update (gradient and weight decay
    alike) is a quarter of the run's, every other parameter's is unchanged."""
    config = smoke_config("dfr")
    config.optimizer.name = name
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 10)
    assert detectors.DECODER in state.params  # the subtree the factor applies to
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)

    def first_update(tx):  # one program (op by op, each parameter's shape would compile)
        return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(state.params, grads)

    plain = first_update(state.tx)
    config.dfr.base_learning_rate = config.optimizer.base_learning_rate / 4
    scaled = first_update(optimizers.make_optimizer(config, total_steps=10))
    plain, scaled = flatten_dict(plain, sep="/"), flatten_dict(scaled, sep="/")
    assert any(np.any(np.asarray(u) != 0) for u in plain.values())
    for path, update in plain.items():
        factor = 0.25 if path.startswith(detectors.DECODER + "/") else 1.0
        np.testing.assert_allclose(
            np.asarray(scaled[path]), factor * np.asarray(update), rtol=1e-6, err_msg=path
        )


def test_negative_decoder_learning_rate_is_a_clear_error(load_config):
    config = load_config("synthetic,dfr")
    config.dfr.base_learning_rate = -1e-3
    with pytest.raises(ValueError, match=r"config.dfr.base_learning_rate must be >= 0"):
        optimizers.check_optimizer(config)


def test_unknown_optimizer_is_a_clear_error(load_config):
    config = load_config("synthetic,real")
    config.optimizer.name = "lamb"
    with pytest.raises(ValueError, match=r"Unknown config.optimizer.name 'lamb'.*adamw"):
        optimizers.check_optimizer(config)


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": np.ones((3, 3, 2, 2)), "alpha": np.ones(2), "bias": np.ones(2)}}
    mask = optimizers.weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True, "alpha": False, "bias": False}}


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "yolo", r"Unknown config.model.name 'yolo'.*fcos"),
        (
            "model.binary_parts",
            ("backbone", "decoder"),
            r"binary_parts entries \['decoder'\]; valid choices: \['backbone'",
        ),
        ("model.binary.scale", "per_tensor", r"Unknown scale 'per_tensor'"),
        ("model.binary.input_quantizer", "tanh", r"Unknown binary quantizer 'tanh'"),
        ("model.dtype", "float16", r"Unknown config.model.dtype"),
        ("dfr.mode", "both", r"Unknown config.dfr.mode 'both'"),
        ("dfr.levels", (2, 7), r"config.dfr.levels \[7\]"),
        ("fcos.regress_ranges", ((-1.0, 1e8),), r"1 ranges for 5 FPN levels"),
        ("fcos.score_mode", "sqrt", r"Unknown config.fcos.score_mode 'sqrt'.*'mmdet'"),
        ("fcos.box_activation", "softplus", r"Unknown config.fcos.box_activation 'softplus'"),
        ("model.name", "retinanet", r"needs a config.retinanet section.*retinanet_r18.py"),
        ("retinanet.box_loss", "l2", r"Unknown config.retinanet.box_loss 'l2'"),
        ("retinanet.negative_iou", 0.6, r"negative_iou <= positive_iou"),
        ("retinanet.aspect_ratios", (), r"at least one aspect ratio"),
        ("faster_rcnn.rpn_negative_iou", 0.8, r"rpn_negative_iou <= rpn_positive_iou"),
        ("faster_rcnn.roi_num_samples", 2000, r"roi_num_samples=2000 exceeds the proposals"),
        ("faster_rcnn.rpn_scales_per_octave", 0, r"scales_per_octave >= 1"),
    ],
)
def test_config_errors_are_clear(load_config, field, value, message):
    family = field.split(".")[0] if field.startswith(("retinanet", "faster_rcnn")) else "fcos"
    config = load_config("synthetic,dfr", family)
    parent, name = field.rsplit(".", 1) if "." in field else ("", field)
    node = config
    for part in parent.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=message):
        registry.validate_config(config)


def test_config_argument_errors(load_config):
    with pytest.raises(
        ValueError,
        match=r"Unknown variant 'xnor'; valid choices: \['real', 'bnn', 'dfr', 'lsq4'\] "
        r"\(configs/fcos_r18.py takes '<dataset>,<variant>\[,demo\]\[,smoke\]'; "
        r"got 'synthetic,xnor'\)",
    ):
        load_config("synthetic,xnor")
    with pytest.raises(
        ValueError, match=r"Unknown data set 'coco'.*configs/retinanet_r18.py takes"
    ):
        load_config("coco,real", "retinanet")
    with pytest.raises(ValueError, match=r"dataset in \['synthetic'.*variant in \['real'"):
        load_config("synthetic")
    with pytest.raises(ValueError, match=r"the data set comes first, 'synthetic,dfr'"):
        load_config("dfr,synthetic,demo")
    config = load_config("aitod,bnn")
    assert config.loss.dfr_weight == 0 and config.model.binary_parts
    assert load_config("aitod,real").model.binary_parts == ()


def test_smoke_implies_demo_and_every_smoke_config_is_valid(load_config):
    parse = base_config.parse_arg
    assert parse("synthetic,dfr,smoke", "f.py") == ("synthetic", "dfr", True, True)
    assert parse("demo,synthetic,real", "f.py") == ("synthetic", "real", True, False)
    assert parse("synthetic,bnn,demo,smoke", "f.py") == ("synthetic", "bnn", True, True)
    for family in ("fcos", "retinanet", "faster_rcnn"):
        config = load_config("synthetic,dfr,smoke", family)
        registry.validate_config(config)
        assert (config.model.max_level, config.optimizer.name) == (4, "sgd")


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
    sharding.check_batch_divides(8, "config.train.batch_size")
    with pytest.raises(
        ValueError, match=r"config.train.batch_size=6 does not divide over 4 devices"
    ):
        sharding.check_batch_divides(6, "config.train.batch_size")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(smoke_config, make_batch):
    config = smoke_config("dfr")
    config.model.dtype = "bfloat16"
    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), 3)
    step = jax.jit(steps.make_train_step(config, model, 3))
    for _ in range(2):
        state, metrics = step(state, make_batch())
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["loss_dfr"]))
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    assert {m.dtype for m in jax.tree.leaves(state.opt_state) if hasattr(m, "dtype")} <= {
        np.dtype("float32"),
        np.dtype("int32"),
    }


def test_non_finite_loss_names_the_step_and_images():
    metrics = {"loss": np.float32("nan"), "loss_cls": np.float32(1.0)}
    with pytest.raises(FloatingPointError, match=r"at step 7 \(images \[11, 12\]\).*loss_cls"):
        run_utils.check_finite(7, metrics, np.array([11, 12]))
    run_utils.check_finite(8, {"loss": np.float32(2.0)}, None)


def test_a_jumping_loss_part_is_named_as_it_happens(monkeypatch):
    """The replayed divergence of RESULTS.md's "A steady decoder": L_DFR and the gradient norm jump
    at the fourth logged step, while L_det stays; each jump is warned about once."""
    warned = []
    monkeypatch.setattr(run_utils.logging, "warning", lambda *args: warned.append(args))
    watch = run_utils.SpikeWatch("runs/replay", factor=10.0)
    logged = [  # (step, L_det, L_DFR, grad_norm), as the log shows them
        (500, 0.50, 0.34, 0.7),
        (525, 0.48, 0.36, 0.8),
        (550, 0.49, 1.30, 1.1),
        (575, 0.51, 65.3, 226.0),
        (600, 0.52, 70.1, 30.0),
    ]
    jumped = [
        watch.check(step, {"loss_det": d, "loss_dfr": r, "grad_norm": g, "learning_rate": 9.0})
        for step, d, r, g in logged
    ]
    assert jumped == [[], [], [], ["loss_dfr", "grad_norm"], []]
    # The running level before step 575, by hand: 0.9 * (0.9 * 0.34 + 0.1 * 0.36) + 0.1 * 1.3.
    level = 0.9 * (0.9 * 0.34 + 0.1 * 0.36) + 0.1 * 1.3
    step, name, value, ratio, before = warned[0][1:6]
    assert (step, name, value) == (575, "loss_dfr", 65.3)
    assert before == pytest.approx(level) and ratio == pytest.approx(65.3 / level)
    assert warned[0][6:] == ("runs/replay", 550)  # the workdir and the last step logged before
    off = run_utils.SpikeWatch("w", factor=0.0)
    assert [off.check(s, {"loss_dfr": r}) for s, _, r, _ in logged] == [[]] * len(logged)
