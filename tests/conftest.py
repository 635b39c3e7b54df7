"""Shared fixtures: configs from configs/ (the smoke setting for anything that builds or trains
a detector) and hand-made batches. Each fixture is a factory, so a test picks the variant,
family and sizes it needs.

Every test process compiles with cheap CPU code generation (as the runs test_resume.py and
test_multiprocess.py start) and shares one persistent compilation cache: the tests check
numbers, not speed, and spend most of their time compiling. No fake CPU devices are set:
in-process tests run on one device, and the multi-device runs (test_multiprocess.py) set their
own device count in each worker process.
"""

import os
import shutil
import tempfile

import jax
import pytest
import smoke

# Read when JAX starts its backend, after this module is imported.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {smoke.cheap_codegen_flags()}".strip()

# One persistent compilation cache per test run, shared by the pytest-xdist workers (they
# inherit the variable from the controller, which sets it first) and every process the tests
# start: the same smoke detectors compile in many tests. The process that made it removes it.
_OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JIT_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfrdet_jax_test_jit_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # This process imported jax (through smoke) before setting them: it takes them here, so that
    # a run without pytest-xdist's workers (which read them at their own import) uses the cache.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


def pytest_sessionfinish(session):  # pylint: disable=unused-argument
    if _OWN_JIT_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    # The slow tests first (each group in its own order): pytest-xdist's workers then finish on
    # quick tests, instead of one idling while the other runs a minute-long one at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def load_config():
    """load_config(arg, family="fcos"): get_config(arg) of configs/<family>_r18.py."""
    return smoke.load_config


@pytest.fixture
def smoke_config():
    """smoke_config(variant, family="fcos", batch_size=2): the ``smoke`` config of a family."""
    return smoke.smoke_config


@pytest.fixture
def make_batch():
    """make_batch(seed=0, batch_size=2, size=64, num_boxes=8, max_boxes=12): squares of 3
    classes on noise, in the standard batch format (``num_boxes=0``: images without boxes)."""
    return smoke.make_batch
