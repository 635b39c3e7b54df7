"""The smoke config, hand-made batches and a memory probe as plain functions: conftest.py hands
them to the tests as fixtures, and the scripts tests run as subprocesses (resume_config.py,
multiprocess_worker.py), which cannot take fixtures, import them from here. Also the loader of
the benchmark scripts the tests run."""

import importlib.metadata
import importlib.util
import pathlib
import sys

import jax
import numpy as np

from dfrdet_jax import checkpointing, steps
from dfrdet_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cheap_codegen_flags() -> str:
    """XLA_FLAGS for quick CPU compiles: every test process (conftest.py, and the processes the
    tests start) sets them, as the tests check numbers, not speed, and spend most of their time
    compiling. The fusion emitters of jaxlib 0.6 and later make a tiny detector's train step
    compile 1.6-1.75x longer and run no faster (README, "Run the tests"); jaxlib before 0.6
    knows no such option, and XLA aborts on an option it does not know."""
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    major, minor = (int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
    if (major, minor) >= (0, 6):
        flags += " --xla_cpu_use_fusion_emitters=false"
    return flags


def _load_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass in it looks its module up there
    spec.loader.exec_module(module)
    return module


def load_config(arg, family="fcos"):
    """get_config(arg) of configs/<family>_r18.py."""
    name = f"{family}_r18"
    return _load_module(name, ROOT / "configs" / f"{name}.py").get_config(arg)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module; its imports of the folder's other scripts (e.g.
    train_throughput) resolve as when it runs as a script."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return _load_module(name, ROOT / "benchmarks" / f"{name}.py")
    finally:
        sys.path.pop(0)


def temp_buffers_per_layer(build, x, depths=(2, 6)) -> float:
    """How many x-sized buffers XLA's temporaries for a gradient grow by per layer.

    Args:
      build: depth -> (loss(params, x), params) of a stack of ``depth`` layers.
      x: the input; its size is the unit.
      depths: the two depths compared.
    """
    sizes = []
    for depth in depths:
        loss, params = build(depth)
        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        sizes.append(compiled.memory_analysis().temp_size_in_bytes / (x.size * x.dtype.itemsize))
    return (sizes[1] - sizes[0]) / (depths[1] - depths[0])


def smoke_config(variant, family="fcos", batch_size=2):
    """configs/<family>_r18.py:synthetic,<variant>,smoke at global batch ``batch_size``, with
    the smoke learning rate (0.01) at that batch."""
    config = load_config(f"synthetic,{variant},smoke", family)
    config.train.batch_size = batch_size
    config.optimizer.base_batch_size = batch_size
    return config


def make_batch(seed=0, batch_size=2, size=64, num_boxes=8, max_boxes=12):
    """Bright squares of 3 classes on a dark noisy background, in the standard batch format;
    ``num_boxes=0`` gives images without any box (all ``box_valid`` False)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (batch_size, size, size, 3)).astype(np.uint8)
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    labels = np.full((batch_size, max_boxes), -1, np.int32)
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
        "image_id": np.arange(batch_size, dtype=np.int32) + seed * batch_size,
        "image_hw": np.full((batch_size, 2), size, np.int32),
        "scale": np.ones(batch_size, np.float32),
    }


def save_run(workdir, config, steps_saved, *, shift=0.0, num_classes=8, seed=None, best=0.5):
    """Checkpoints an untrained state of ``config``'s detector as a run leaves them: each step of
    ``steps_saved`` as a latest checkpoint, the last also as the best (metric ``best``), and the
    run's config.json. ``shift`` is added to every parameter, so that they differ from any
    initialisation; ``seed`` (default config.seed) draws them. Returns the state."""
    model = registry.build_model(config, num_classes=num_classes)
    key = jax.random.key(config.seed if seed is None else seed)
    state = steps.create_train_state(config, model, key, (64, 64), 12)
    state = state.replace(params=jax.tree.map(lambda p: p + shift, state.params))
    checkpoints = checkpointing.Checkpointer(str(workdir))
    for step in steps_saved:
        checkpoints.save(step, state.replace(step=step), None)
    checkpoints.save_best(steps_saved[-1], state, best)
    checkpoints.wait()
    checkpointing.write_run_config(str(workdir), config)
    return state
