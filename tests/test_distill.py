"""Distillation from a frozen real teacher: the two loss terms against numpy (values and
gradients), the config checks, and a train step that distils from a saved real run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke

from dfrdet_jax import distill, sharding, steps
from dfrdet_jax.losses import distill as distill_losses
from dfrdet_jax.models import registry
from dfrdet_jax.models.detectors import normalize_images


def _maps(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def test_feature_imitation_value_and_gradient_by_numpy():
    shapes = [(2, 4, 4, 3), (2, 2, 2, 3)]
    student, teacher = _maps(0, shapes), _maps(1, shapes)
    teacher[1] *= 5.0  # a level at another scale weighs the same after normalisation
    want = np.mean([np.mean((s - t) ** 2) / np.mean(t**2) for s, t in zip(student, teacher)])
    got = distill_losses.feature_imitation(student, teacher)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    grads = jax.grad(distill_losses.feature_imitation, argnums=(0, 1))(student, teacher)
    for s, t, g_s, g_t in zip(student, teacher, *grads):
        # d/dS of mean((S - T)^2) / mean(T^2) / L, with L = 2 levels
        np.testing.assert_allclose(g_s, 2 * (s - t) / s.size / np.mean(t**2) / 2, rtol=1e-4)
        np.testing.assert_array_equal(g_t, 0.0)  # the teacher does not learn
    assert float(distill_losses.feature_imitation(teacher, teacher)) == 0.0
    zeros = [np.zeros_like(t) for t in teacher]
    np.testing.assert_allclose(distill_losses.feature_imitation(zeros, teacher), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        distill_losses.feature_imitation(student, [t[:, :1] for t in teacher])


def test_sigmoid_kl_value_and_gradient_by_numpy():
    s, t = _maps(2, [(2, 5, 3)] * 2)
    t = 3 * t  # confident teacher
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p, q = sig(t), sig(s)
    want = np.mean(np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), -1))
    np.testing.assert_allclose(distill_losses.sigmoid_kl(s, t), want, rtol=1e-5)
    g_s, g_t = jax.grad(distill_losses.sigmoid_kl, argnums=(0, 1))(s, t)
    np.testing.assert_allclose(g_s, (q - p) / (2 * 5), rtol=1e-4, atol=1e-7)  # mean over B x P
    np.testing.assert_array_equal(g_t, 0.0)
    assert abs(float(distill_losses.sigmoid_kl(t, t))) < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        distill_losses.sigmoid_kl(s, t[:, :4])


def test_config_checks(smoke_config, tmp_path):
    config = smoke_config("bnn")
    distill.validate(config)  # off by default
    config.distill.feature_weight = 1.0
    with pytest.raises(ValueError, match="need config.distill.teacher"):
        distill.validate(config)
    config.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        distill.validate(config)
    (tmp_path / "nowhere" / "checkpoints").mkdir(parents=True)
    distill.validate(config)
    config.distill.levels = (2, 7)
    with pytest.raises(ValueError, match=r"levels \[7\] are not FPN levels"):
        distill.validate(config)
    config.distill.levels = ()
    assert distill.levels(config) == (2, 3, 4)  # smoke: P2-P4
    config.distill.feature_weight = 0.0
    with pytest.raises(ValueError, match="both distillation weights are 0"):
        distill.validate(config)
    rcnn = smoke_config("bnn", "faster_rcnn")
    rcnn.distill.teacher, rcnn.distill.logit_weight = config.distill.teacher, 1.0
    with pytest.raises(ValueError, match="needs a dense head"):
        distill.validate(rcnn)
    rcnn.distill.logit_weight, rcnn.distill.feature_weight = 0.0, 1.0
    distill.validate(rcnn)
    teacher = distill.teacher_config(smoke_config("dfr"))
    assert teacher.model.binary_parts == () and teacher.dfr.levels == ()


@pytest.mark.slow
def test_train_step_distils_from_a_saved_real_run(smoke_config, make_batch, tmp_path, capsys):
    image_hw = (64, 64)
    real = smoke.save_run(
        tmp_path / "teacher", smoke_config("real"), [5], shift=0.1, num_classes=3, seed=1
    )
    config = smoke_config("dfr")
    config.distill.teacher = str(tmp_path / "teacher")
    config.distill.feature_weight = 0.5
    config.distill.logit_weight = 2.0
    mesh = sharding.make_mesh()
    teacher = distill.load_teacher(config, 3, image_hw, sharding.replicated_sharding(mesh))
    assert "(best checkpoint, step 5)" in capsys.readouterr().out
    assert jax.tree.structure(teacher.variables["params"]) == jax.tree.structure(real.params)
    np.testing.assert_array_equal(  # the saved (perturbed) weights, not a fresh init
        teacher.variables["params"]["head"]["cls_logits"]["kernel"],
        real.params["head"]["cls_logits"]["kernel"],
    )

    model = registry.build_model(config, num_classes=3)
    state = steps.create_train_state(config, model, jax.random.key(0), image_hw, 10)
    batch = make_batch(num_boxes=4)
    step = steps.make_train_step(config, model, 10, teacher.model)
    _, metrics = jax.jit(step)(state, batch, teacher.variables)

    # Without the teacher: the same loss forward only (the step's key), and the student's
    # features, in one program.
    @jax.jit
    def plain_and_features(params, batch_stats):
        rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
        _, (plain, _) = steps.loss_and_metrics(
            params, batch_stats, batch, rng, model=model, config=config
        )
        outputs, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            normalize_images(batch["image"]),
            train=True,
            features=True,
            mutable=["batch_stats", "losses"],
        )
        return plain, outputs["features"]

    plain, student_features = plain_and_features(state.params, state.batch_stats)
    assert float(metrics["loss_distill_features"]) > 0 and float(metrics["loss_distill_logits"]) > 0
    np.testing.assert_allclose(
        metrics["loss"],
        plain["loss"]
        + 0.5 * metrics["loss_distill_features"]
        + 2.0 * metrics["loss_distill_logits"],
        rtol=1e-5,
    )
    assert "loss_distill_features" not in plain

    # The same terms computed directly from the two networks' outputs.
    images = normalize_images(batch["image"])
    teacher_apply = jax.jit(teacher.model.apply, static_argnames=("train", "features"))
    teacher_out = teacher_apply(teacher.variables, images, train=False, features=True)
    without = jax.eval_shape(
        lambda v, x: teacher.model.apply(v, x, train=False), teacher.variables, images
    )
    assert "features" not in without
    np.testing.assert_allclose(
        metrics["loss_distill_features"],
        distill_losses.feature_imitation(student_features, teacher_out["features"]),
        rtol=1e-4,
    )

    wider = smoke_config("real")
    wider.model.fpn_width = 32
    smoke.save_run(tmp_path / "other", wider, [5], shift=0.1, num_classes=3, seed=1)
    config.distill.teacher = str(tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"other FPN maps .* model.fpn_width: 32 \(teacher\) vs 16"
    ):
        distill.load_teacher(config, 3, image_hw, sharding.replicated_sharding(mesh))
    # Without config.json the teacher must be the real variant of this config, tensor for tensor.
    (tmp_path / "other" / "config.json").unlink()
    with pytest.raises(
        ValueError,
        match=r"does not match its network.*head/bbox_pred/kernel: \(3, 3, 32, 4\) stored",
    ):
        distill.load_teacher(config, 3, image_hw, sharding.replicated_sharding(mesh))


def test_a_teacher_of_the_1bit_topology_in_real_values(smoke_config, tmp_path):
    # The 1-bit network's own topology with real weights and activations (the experiments'
    # start_topology) teaches; a quantized network does not.
    topology = smoke_config("bnn")
    topology.model.binary.input_quantizer = topology.model.binary.weight_quantizer = "none"
    smoke.save_run(tmp_path / "topology", topology, [4], num_classes=3)
    config = smoke_config("dfr")
    config.distill.teacher, config.distill.feature_weight = str(tmp_path / "topology"), 1.0
    mesh = sharding.make_mesh()
    teacher = distill.load_teacher(config, 3, (64, 64), sharding.replicated_sharding(mesh))
    student = registry.build_model(config, num_classes=3)
    student_params = jax.eval_shape(
        lambda: student.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    shared = set(student_params["params"]) - {"decoder"}
    assert set(teacher.variables["params"]) == shared  # the same topology, no decoder
    smoke.save_run(tmp_path / "quantized", smoke_config("bnn"), [4], num_classes=3)
    config.distill.teacher = str(tmp_path / "quantized")
    with pytest.raises(ValueError, match=r"trained a quantized network \(variant 'bnn'"):
        distill.load_teacher(config, 3, (64, 64), sharding.replicated_sharding(mesh))
