"""Targets assigned in the input pipeline (FCOS's points, RetinaNet's anchors, Faster R-CNN's
RPN anchors) give the loss and gradients of assigning them in the step, on the pipeline's own
batches and hand-made ones."""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke

from dfrdet_jax import data, steps
from dfrdet_jax.models import registry
from dfrdet_jax.models.heads import single_stage

KEY = single_stage.MATCHED_SLOT


def _batches(config, tmp_path):
    """(number of classes, [a batch from the training pipeline, a hand-made batch with an ignore
    region and a box past the image]), both carrying the pipeline's assignment."""
    config.data.root = str(tmp_path)
    config.data.synthetic.num_train = 4
    assign = registry.pipeline_targets(config)
    assert isinstance(assign, single_stage.PipelineTargets)
    assign = pickle.loads(pickle.dumps(assign))  # as the pipeline's workers get it
    dataset = data.build_dataset(
        config.data, "train", train=True, batch_size=2, seed=0, example_map=assign
    )
    from_pipeline = next(iter(dataset.loader))
    # The pipeline's slot count: one compiled step serves both batches.
    slots = from_pipeline["boxes"].shape[1]
    hand_made = smoke.make_batch(size=config.data.image_size, num_boxes=6, max_boxes=slots)
    hand_made["ignore"][0, 1] = True
    hand_made["boxes"][1, 0] = [50, 50, 90, 70]
    examples = [{k: v[i] for k, v in hand_made.items()} for i in range(2)]
    hand_made[KEY] = np.stack([assign(e)[KEY] for e in examples])
    for batch in (from_pipeline, hand_made):
        assert batch[KEY].dtype == np.int32 and (batch[KEY] >= 0).any()
    return dataset.num_classes, [from_pipeline, hand_made]


def _without_targets(batch):
    return {k: v for k, v in batch.items() if k != KEY}


def _random_outputs(family, num_locations, rng):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    outputs = {"cls_logits": normal(2, num_locations, 3)}
    if family == "fcos":
        outputs.update(
            ltrb=jnp.exp(normal(2, num_locations, 4)) * 8, centerness=normal(2, num_locations)
        )
    else:
        outputs["deltas"] = normal(2, num_locations, 4)
    return outputs


@pytest.mark.parametrize("family", ["fcos", "retinanet"])
def test_targets_from_the_pipeline_give_the_loss_and_gradients_of_the_step(family, tmp_path):
    config = smoke.smoke_config("bnn", family)
    _, batches = _batches(config, tmp_path)
    for batch in batches:
        outputs = _random_outputs(family, batch[KEY].shape[1], np.random.default_rng(0))

        def total(outputs, batch):
            parts = registry.detection_loss(config, outputs, batch)
            loss = sum(v for k, v in parts.items() if k.startswith("loss_"))
            return loss, parts["num_positive"]

        # Under jit: op by op, every operation of the assignment would compile alone.
        loss_and_grads = jax.jit(jax.value_and_grad(total, has_aux=True))
        (loss, positives), grads = loss_and_grads(outputs, batch)
        (loss_ref, positives_ref), grads_ref = loss_and_grads(outputs, _without_targets(batch))
        assert float(positives) == float(positives_ref) > 0
        np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
        for name in outputs:
            np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-6, atol=1e-9)


def test_the_rpn_anchors_matched_in_the_pipeline_give_the_loss_and_gradients_of_the_step(
    tmp_path,
):
    config = smoke.smoke_config("bnn", "faster_rcnn")
    num_classes, batches = _batches(config, tmp_path)
    model = registry.build_model(config, num_classes=num_classes)
    size = config.data.image_size
    state = steps.create_train_state(config, model, jax.random.key(0), (size, size), 1)
    loss_and_grads = jax.jit(
        jax.value_and_grad(
            functools.partial(steps.loss_and_metrics, model=model, config=config), has_aux=True
        )
    )
    rng = jax.random.key(3)  # the same anchor and RoI draws both ways
    for batch in batches:
        (loss, (metrics, _)), grads = loss_and_grads(state.params, state.batch_stats, batch, rng)
        (loss_ref, (metrics_ref, _)), grads_ref = loss_and_grads(
            state.params, state.batch_stats, _without_targets(batch), rng
        )
        assert float(metrics["num_rpn_positive"]) == float(metrics_ref["num_rpn_positive"]) > 0
        for name in ("loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box"):
            np.testing.assert_allclose(float(metrics[name]), float(metrics_ref[name]), rtol=1e-6)
        np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
        jax.tree.map(
            lambda g, g_ref: np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-8),
            grads,
            grads_ref,
        )
    wrong = {**batches[1], KEY: batches[1][KEY][:, :7]}
    with pytest.raises(ValueError, match="'matched_slot'\\] holds 7 locations"):
        loss_and_grads(state.params, state.batch_stats, wrong, rng)  # raised while tracing
    config.faster_rcnn.targets_in_pipeline = False
    assert registry.pipeline_targets(config) is None


@pytest.mark.parametrize("family", ["fcos", "retinanet"])
def test_pipeline_targets_are_off_when_the_config_says_so_and_the_count_is_checked(family):
    config = smoke.smoke_config("bnn", family)
    config[family].targets_in_pipeline = False
    assert registry.pipeline_targets(config) is None
    batch = smoke.make_batch(size=config.data.image_size)
    batch[KEY] = np.zeros((2, 7), np.int32)
    config[family].targets_in_pipeline = True
    num = len(registry.pipeline_targets(config)(
        {k: v[0] for k, v in batch.items()})[KEY])  # fmt: skip
    outputs = _random_outputs(family, num, np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"'matched_slot'\\] holds 7 locations, the head {num}"):
        registry.detection_loss(config, outputs, batch)
