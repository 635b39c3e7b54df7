"""Targets assigned in the input pipeline (FCOS's points, RetinaNet's anchors) give the loss and
gradients of assigning them in the step, on the pipeline's own batches and hand-made ones."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke

from dfrdet_jax import data
from dfrdet_jax.models import registry
from dfrdet_jax.models.heads import single_stage


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
    config.data.root = str(tmp_path)
    config.data.synthetic.num_train = 4
    assign = registry.pipeline_targets(config)
    assert isinstance(assign, single_stage.PipelineTargets)
    assign = pickle.loads(pickle.dumps(assign))  # as the pipeline's workers get it
    dataset = data.build_dataset(
        config.data, "train", train=True, batch_size=2, seed=0, example_map=assign
    )
    from_pipeline = next(iter(dataset.loader))
    # A hand-made batch too, with an ignore region and a box past the image.
    hand_made = smoke.make_batch(size=config.data.image_size, num_boxes=6, max_boxes=9)
    hand_made["ignore"][0, 1] = True
    hand_made["boxes"][1, 0] = [50, 50, 90, 70]
    examples = [{k: v[i] for k, v in hand_made.items()} for i in range(2)]
    key = single_stage.MATCHED_SLOT
    hand_made[key] = np.stack([assign(e)[key] for e in examples])

    for batch in (from_pipeline, hand_made):
        slots = batch[key]
        assert slots.dtype == np.int32 and (slots >= 0).any()
        in_step = {k: v for k, v in batch.items() if k != key}
        outputs = _random_outputs(family, slots.shape[1], np.random.default_rng(0))

        def total(outputs, batch):
            parts = registry.detection_loss(config, outputs, batch)
            loss = sum(v for k, v in parts.items() if k.startswith("loss_"))
            return loss, parts["num_positive"]

        (loss, positives), grads = jax.value_and_grad(total, has_aux=True)(outputs, batch)
        (loss_ref, positives_ref), grads_ref = jax.value_and_grad(total, has_aux=True)(
            outputs, in_step
        )
        assert float(positives) == float(positives_ref) > 0
        np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
        for name in outputs:
            np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", ["fcos", "retinanet"])
def test_pipeline_targets_are_off_when_the_config_says_so_and_the_count_is_checked(family):
    config = smoke.smoke_config("bnn", family)
    config[family].targets_in_pipeline = False
    assert registry.pipeline_targets(config) is None
    assert registry.pipeline_targets(smoke.smoke_config("bnn", "faster_rcnn")) is None
    batch = smoke.make_batch(size=config.data.image_size)
    batch[single_stage.MATCHED_SLOT] = np.zeros((2, 7), np.int32)
    config[family].targets_in_pipeline = True
    num = len(registry.pipeline_targets(config)(
        {k: v[0] for k, v in batch.items()})[single_stage.MATCHED_SLOT])  # fmt: skip
    outputs = _random_outputs(family, num, np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"'matched_slot'\\] holds 7 locations, the head {num}"):
        registry.detection_loss(config, outputs, batch)
