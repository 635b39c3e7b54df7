"""The binary-layers notebook runs top to bottom (its code cells, in order)."""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_binary_layers_notebook_runs():
    notebook = json.loads((ROOT / "colabs" / "binary_layers.ipynb").read_text())
    namespace = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "binary_layers.ipynb", "exec"), namespace)
    assert float(namespace["ce"]) < 0.5
