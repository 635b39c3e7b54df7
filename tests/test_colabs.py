"""The notebooks run top to bottom (their code cells, in order)."""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(name: str, replace: dict[str, str] | None = None) -> dict:
    """Executes the code cells of colabs/``name``; ``replace`` edits their source first (each
    key must occur), e.g. to shorten a training budget."""
    notebook = json.loads((ROOT / "colabs" / name).read_text())
    source = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for old, new in (replace or {}).items():
        assert any(old in cell for cell in source), f"{old!r} is not in {name}"
        source = [cell.replace(old, new) for cell in source]
    namespace = {}
    for cell in source:
        exec(compile(cell, name, "exec"), namespace)
    return namespace


def test_binary_layers_notebook_runs():
    assert float(_run("binary_layers.ipynb")["ce"]) < 0.5


@pytest.mark.slow
def test_quickstart_runs_from_an_installed_package_outside_a_checkout(tmp_path):
    # As on a fresh Colab runtime: the package built as a wheel and installed (its configs
    # with it) into a folder on PYTHONPATH, the notebook run in a folder that is no checkout.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("dfrdet_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what pip install --target puts there
    runner = tmp_path / "run_notebook.py"
    runner.write_text(
        "import json, pathlib, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_colabs import _run\n"
        "ns = _run(sys.argv[2], json.loads(sys.argv[3]))\n"
        "import dfrdet_jax\n"
        "print(json.dumps({'package': dfrdet_jax.__file__, 'metrics': sorted(ns['metrics']),\n"
        "                  'out': str(ns['OUT']), 'l1_fg': float(ns['l1_fg']),\n"
        "                  'shapes': [ns['reconstruction'].shape, ns['images'].shape[1:]]}))\n"
    )
    replace = {
        "NUM_STEPS = 1200": "NUM_STEPS = 3",
        '{VARIANT},demo")': '{VARIANT},demo,smoke")',  # the tests' detector: a quicker compile
        "DATA_ROOT = None": f"DATA_ROOT = {str(tmp_path)!r}",
    }
    result = subprocess.run(
        [sys.executable, str(runner), str(ROOT / "tests"), "quickstart.ipynb", json.dumps(replace)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(site))  # not the checkout's copy
    assert {"AP", "AP_vt", "AP_t"} <= set(found["metrics"])
    out = pathlib.Path(found["out"])
    assert (out / "val0_detections.png").exists() and (out / "dfr.png").exists()
    assert found["shapes"][0] == found["shapes"][1]
    assert np.isfinite(found["l1_fg"])


@pytest.mark.slow
def test_figures_notebook_writes_every_figure(tmp_path):
    namespace = _run(
        "figures.ipynb",
        {
            "NUM_STEPS = 1200": "NUM_STEPS = 2",
            'SETTING = "demo"': 'SETTING = "demo,smoke"',
            "DATA_ROOT = None": f"DATA_ROOT = {str(tmp_path)!r}",
        },
    )
    written = namespace["written"]
    assert {name.split("_")[0] for name in written} == {
        "outcomes", "saliency", "reconstruction", "pr", "training"
    }  # fmt: skip
    assert sum(name.startswith("outcomes_") for name in written) == 2  # viz.num_images
    for name in written:
        picture = np.asarray(Image.open(namespace["figures"] / name).convert("L"), np.float32)
        assert picture.std() > 1, name  # something drawn
