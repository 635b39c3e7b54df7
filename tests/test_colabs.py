"""The notebooks run top to bottom (their code cells, in order)."""

import json
import pathlib

import numpy as np
import pytest

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
def test_quickstart_notebook_trains_evaluates_and_draws(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = _run(
        "quickstart.ipynb",
        {"NUM_STEPS = 1200": "NUM_STEPS = 3", "DATA_ROOT = None": f"DATA_ROOT = {str(tmp_path)!r}"},
    )
    assert {"AP", "AP_vt", "AP_t"} <= namespace["metrics"].keys()
    out = namespace["OUT"]
    assert (out / "val0_detections.png").exists() and (out / "dfr.png").exists()
    assert namespace["reconstruction"].shape == namespace["images"].shape[1:]
    assert np.isfinite(namespace["l1_fg"])
