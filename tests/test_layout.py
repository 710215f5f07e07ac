"""The package layout: imports run one way (definition <- kernels/hf/onnx/training <- compress <- cli), no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones. Package __init__ files re-export and are checked for cycles only.
LAYERS = {
    "model.kernels": 0,
    "model.data": 0,
    "model": 1,  # the model definition: config, transformer, attention, quantized, losses, io, rebuild
    "model.hf": 2,
    "model.onnx": 2,
    "model.training": 2,
    "compress": 3,
    "compress.cli": 4,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("model", "compress"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (lazy imports inside functions too)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                targets.add(child if child in modules else node.module)
    return {t for t in targets if t in modules and t != name}


def _layer(name: str) -> int:
    """The layer of the longest LAYERS prefix that names the module's package."""
    return LAYERS[max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_layout_names_the_architecture():
    for package in (
        "model/kernels",
        "model/hf",
        "model/onnx",
        "model/training",
        "model/data",
        "compress/evaluate",
        "compress/cli",
    ):
        assert (ROOT / package / "__init__.py").is_file(), package


def test_imports_run_one_way(graph):
    modules = _modules()
    wrong = []
    for name, targets in graph.items():
        if modules[name].name == "__init__.py":
            continue
        for target in targets:
            if modules[target].name != "__init__.py" and _layer(target) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_model_never_imports_compress(graph):
    assert not [
        f"{n} -> {t}" for n, ts in graph.items() if n.startswith("model") for t in ts if t.startswith("compress")
    ]


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    """The graph walker finds lazy imports inside functions (the kind that slip through)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from compress.pipeline import Pipeline\n    import model.io\n")
    modules = {"compress.pipeline": ROOT, "model.io": ROOT, "m": source}
    assert _imports("m", source, modules) == {"compress.pipeline", "model.io"}
