"""`cpews` never imports ray, optuna or mlflow, and the modules of `cpews.training` import each other without
cycles (design.md layering)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cpews

MODULES = [
    "cpews",
    "cpews.config",
    "cpews.data",
    "cpews.model",
    "cpews.training",
    "cpews.evaluation",
    "cpews.cam",
    "cpews.losses",
    "cpews.refine",
    "cpews.metrics",
    "cpews.crf",
    "cpews.prototypes",
    "cpews.prototype_losses",
    "cpews.training.prototype_hooks",
]
TRAINING_DIR = Path(cpews.__file__).parent / "training"


def test_importing_cpews_loads_no_orchestration_stack():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'optuna', 'mlflow'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_orders_have_no_cycles():
    for first in ("cpews.training", "cpews.evaluation", "cpews.evaluation.infer", "cpews.training.trainer"):
        subprocess.run([sys.executable, "-c", f"import {first}"], check=True)


def training_import_graph(folder: Path = TRAINING_DIR) -> dict[str, set[str]]:
    """`{module: modules of cpews.training it imports}` from the `import` statements of `folder/*.py` anywhere in
    the file (inside functions too). `from cpews.training import keys` is an import of `cpews.training.keys`;
    the package `__init__` is `cpews.training`."""
    names = {
        path: "cpews.training" if path.stem == "__init__" else f"cpews.training.{path.stem}"
        for path in sorted(folder.glob("*.py"))
    }
    nodes = set(names.values())
    graph: dict[str, set[str]] = {}
    for path, name in names.items():
        package = "cpews.training" if path.stem == "__init__" else name.rsplit(".", 1)[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""  # `from .x`: in `package`
                module = ".".join(part for part in (base, node.module or "") if part)
                for alias in node.names:
                    imported.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in nodes else module)
        graph[name] = (imported & nodes) - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path `[a, b, ..., a]`, or None when it has none (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_on_hand_made_graphs(tmp_path):
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    folder = tmp_path / "training"
    folder.mkdir()
    (folder / "__init__.py").write_text("from cpews.training.loop import run\n")
    (folder / "loop.py").write_text(
        "from cpews.training import keys\n\ndef run():\n    from .hooks import h\n"
    )
    (folder / "hooks.py").write_text("import cpews.training.loop\n")
    (folder / "keys.py").write_text("import os\n")
    graph = training_import_graph(folder)
    assert graph == {
        "cpews.training": {"cpews.training.loop"},
        "cpews.training.loop": {"cpews.training.keys", "cpews.training.hooks"},
        "cpews.training.hooks": {"cpews.training.loop"},
        "cpews.training.keys": set(),
    }
    assert import_cycle(graph) == ["cpews.training.loop", "cpews.training.hooks", "cpews.training.loop"]


def test_training_modules_import_each_other_without_cycles():
    """The trainer never imports the prototype module, not even inside a function: the public `train` composes
    the default hooks (cpews.training.default_hooks)."""
    graph = training_import_graph()
    assert "cpews.training.prototype_hooks" not in graph["cpews.training.trainer"]
    assert graph["cpews.training.default_hooks"] >= {
        "cpews.training.trainer",
        "cpews.training.prototype_hooks",
    }
    assert import_cycle(graph) is None
