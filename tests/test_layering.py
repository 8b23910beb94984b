"""The packages' import graphs have no circle, and evochi_torch's maths keeps its layers
(docs/architecture.md).

Read from the source with ``ast``: every import counts, also one inside a function or under
``TYPE_CHECKING``, because a lazy import hides a circle rather than removing it. Importing a
submodule also runs its package's ``__init__``; that implicit edge is not counted, or every
package's face (which imports its own submodules) would close a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("evochi", "evochi_torch")

# evochi_torch's ES maths, bottom (0) to top: a module may import only from a lower layer,
# or from its own layer where the graph stays acyclic.
LAYERS: dict[str, int] = {
    "evochi_torch._moved": 0,
    "evochi_torch.portable": 0,
    "evochi_torch.registry": 0,
    "evochi_torch.shaping": 1,
    "evochi_torch.noise": 1,
    "evochi_torch.lowrank": 1,
    "evochi_torch.lowrank_policy": 1,
    "evochi_torch.optim": 1,
    "evochi_torch.population": 1,
    "evochi_torch.config": 2,
    "evochi_torch.strategies": 3,
    "evochi_torch.state": 4,
    "evochi_torch.codec": 5,
    "evochi_torch.functional": 6,
    "evochi_torch.worker": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    known = _modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import name``
                # imports mod.
                targets = [f"{stem}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "evochi_torch.registry" in graph["evochi_torch.config"]
    assert "evochi_torch.strategies.base" in graph["evochi_torch.strategies.pgpe"]
    assert "evochi.v1.errors" in graph["evochi_torch.state"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    graph = {
        name: {t for t in targets if t.startswith(package)}
        for name, targets in import_graph().items()
        if name.startswith(package)
    }
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_across_packages():
    cycle = _cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_maths_imports_only_downward():
    upward = []
    for module, targets in import_graph().items():
        here = _layer(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{module} (layer {here}) -> {target} (layer {there})")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_the_maths_stands_on_layered_modules_only():
    # What a layered module imports from evochi_torch must say where it stands too, so the
    # layers cannot be bypassed through a module the table forgot.
    unplaced = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if _layer(module) is not None
        for target in targets
        if target.startswith("evochi_torch") and _layer(target) is None
    )
    assert not unplaced, "imports of modules without a layer:\n" + "\n".join(unplaced)
