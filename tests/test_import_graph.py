"""The package's layers, read from every module's import statements with ``ast`` (nothing is
imported): the 1-bit layers, ops and losses never reach up; data, evaluation and models stay
below the top-level modules; only main.py imports the training loop; and the top-level modules
and subpackages import each other without a cycle. The leaf modules (``choices``, the one error
for a setting outside its choices) import nothing of the package, and any module may import them.

A module named in a string literal (``importlib.import_module``, ``python -m``) counts as
imported, so main.py's mode table and experiments.py's command lines are edges too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "dfrdet_jax"
LEAVES = {"choices"}
_BELOW_MODELS = {"layers", "ops", "losses"} | LEAVES
# What each subpackage may import, by the name under dfrdet_jax; of the top-level modules only
# the leaves.
ALLOWED = {
    "layers": {"layers"} | LEAVES,
    "ops": _BELOW_MODELS,
    "losses": _BELOW_MODELS,
    "models": _BELOW_MODELS | {"models"},
    "data": _BELOW_MODELS | {"data", "evaluation"},
    "evaluation": _BELOW_MODELS | {"data", "evaluation"},
}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _unit(module):
    """'dfrdet_jax.models.heads.fcos' -> 'models'; 'dfrdet_jax.train' -> 'train'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def _from_base(node, module, path):
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def imports(path):
    """[(line, module)] of every dfrdet_jax module ``path`` imports (or names in a string)."""
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, path)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in MODULES else base))
        elif isinstance(node, ast.Constant) and node.value in MODULES:
            found.append((node.lineno, node.value))
    return [(line, name) for line, name in found if name.split(".")[0] == PACKAGE]


def _where(path, line, name):
    return f"{path.relative_to(ROOT)}:{line} imports {name}"


def find_cycle(graph):
    """A cycle [a, b, ..., a] of ``graph`` {node: set of nodes}, or [] if it has none."""
    state = {}  # node -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return []


def test_the_reader_finds_imports_of_every_form():
    assert {name for _, name in imports(ROOT / PACKAGE / "evaluation" / "dota.py")} == {
        "dfrdet_jax.ops.boxes",
        "dfrdet_jax.ops.nms",
    }
    main = {name for _, name in imports(ROOT / PACKAGE / "main.py")}
    assert {"dfrdet_jax.distributed", "dfrdet_jax.train", "dfrdet_jax.export"} <= main
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_subpackages_import_only_the_layers_below_them(package):
    wrong = [
        _where(path, line, name)
        for module, path in MODULES.items()
        if _unit(module) == package
        for line, name in imports(path)
        if _unit(name) not in ALLOWED[package]
    ]
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_nothing_of_the_package(leaf):
    path = MODULES[f"{PACKAGE}.{leaf}"]
    assert not imports(path), "\n".join(_where(path, line, name) for line, name in imports(path))


def test_only_main_imports_the_training_loop():
    importers = [
        _where(path, line, name)
        for path in MODULES.values()
        for line, name in imports(path)
        if name == "dfrdet_jax.train"
    ]
    assert {i.split(":")[0] for i in importers} == {"dfrdet_jax/main.py"}, "\n".join(importers)


def test_no_import_cycle_among_top_level_modules_and_subpackages():
    graph, edges = {}, {}
    for module, path in MODULES.items():
        for line, name in imports(path):
            a, b = _unit(module), _unit(name)
            if a != b:
                graph.setdefault(a, set()).add(b)
                edges.setdefault((a, b), _where(path, line, name))
    assert "train" in graph["main"] and "models" in graph["steps"]
    cycle = find_cycle(graph)
    assert not cycle, (
        "Import cycle "
        + " -> ".join(cycle)
        + ":\n"
        + "\n".join(edges[a, b] for a, b in zip(cycle, cycle[1:]))
    )
