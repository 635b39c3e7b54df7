"""A new run's starting weights: another run's checkpoint (config.init_from) and a torchvision
ResNet state dict (config.model.pretrained), applied by warm_start and by the training loop."""

import jax
import numpy as np
import pytest
import smoke
from flax import traverse_util
from test_pretrained import torchvision_state_dict

from dfrdet_jax import steps, warm_start
from dfrdet_jax.models import registry


def _state(config):
    model = registry.build_model(config, num_classes=8)
    return steps.create_train_state(config, model, jax.random.key(config.seed), (64, 64), 10)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["latest", "best"])
def test_init_from_moves_a_real_checkpoint_into_a_1bit_model(smoke_config, tmp_path, which, capsys):
    real = smoke.save_run(tmp_path / "real", smoke_config("real"), [7], shift=0.5, best=0.3)
    config = smoke_config("dfr")
    config.init_from = str(tmp_path / "real")
    config.init_from_checkpoint = which
    fresh = _state(config)
    started = warm_start.apply(config, fresh)
    src, got, before = _flat(real.params), _flat(started.params), _flat(fresh.params)
    copied = [p for p in got if p in src and np.shape(src[p]) == np.shape(got[p])]
    assert len(copied) > 20  # stem, norms, shortcuts, binary kernels, prediction convs
    for path in copied:
        np.testing.assert_array_equal(got[path], src[path], err_msg=path)
    for path in got:
        if path.endswith("/alpha") and path[: -len("alpha")] + "kernel" in copied:
            w = got[path[: -len("alpha")] + "kernel"]
            np.testing.assert_allclose(got[path], np.abs(w).mean(axis=tuple(range(w.ndim - 1))))
        elif path not in copied:
            np.testing.assert_array_equal(got[path], before[path], err_msg=path)
    assert any(p.startswith("decoder/") for p in got if p not in copied)  # DFR decoder is new
    assert int(started.step) == 0
    printed = capsys.readouterr().out
    assert f"({which} checkpoint, step 7)" in printed and "tensors loaded" in printed


@pytest.mark.slow
def test_init_from_errors_name_the_folder(smoke_config, tmp_path):
    config = smoke_config("bnn")
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        warm_start.apply(config, _state(config))
    smoke.save_run(tmp_path / "real", smoke_config("real"), [7], shift=0.5, best=0.3)
    config.init_from = str(tmp_path / "real")
    config.init_from_checkpoint = "newest"
    with pytest.raises(ValueError, match="Unknown checkpoint 'newest'"):
        warm_start.apply(config, _state(config))


@pytest.mark.slow
def test_pretrained_backbone_through_the_config(smoke_config, tmp_path):
    import safetensors.numpy

    sd = torchvision_state_dict(18)
    path = str(tmp_path / "resnet18.safetensors")
    safetensors.numpy.save_file(sd, path)
    config = smoke_config("bnn")
    config.model.backbone_width = 64
    config.model.pretrained = path
    started = warm_start.apply(config, _state(config))
    params = _flat(started.params)
    np.testing.assert_array_equal(
        params["backbone/stage3_block2/unit1/conv/kernel"],
        np.transpose(sd["layer3.1.conv1.weight"], (2, 3, 1, 0)),
    )
    stats = _flat(started.batch_stats)
    np.testing.assert_array_equal(stats["backbone/stem_norm/var"], sd["bn1.running_var"])
    config.model.backbone_width = 8  # a narrow backbone cannot take ImageNet weights
    with pytest.raises(ValueError, match="conv1.weight"):
        warm_start.apply(config, _state(config))
