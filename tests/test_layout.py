"""The package's layout rules: no import cycle, no private Lightning import, no file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Modules imported at module level (imports inside functions are lazy and cannot cycle)."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # Lazy imports inside functions count too: a cycle hidden in a function is still a cycle
        # of concepts (and of import order in some call paths).
        deps = {d for d in _lazy_imports(path) if d in modules and d != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Package __init__ re-exports are edges too: a cycle through them still fails at import.
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def _strip_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``a.b`` importing package ``a`` (its __init__) is how Python loads ``a.b`` anyway."""
    return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}


def test_no_import_cycle_between_modules():
    graph = _strip_packages(_graph())
    # A cycle that only passes through a package __init__ is a re-export, not a dependency of
    # the modules themselves: keep edges between leaf modules.
    packages = {n for n in graph if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    leaf = {
        n: {d for d in deps if d not in packages} for n, deps in graph.items() if n not in packages
    }
    assert _cycles(leaf) == []


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_lightning_import():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path) + _lazy_imports(path):
            parts = name.split(".")
            if parts[0] == "lightning" and any(p.startswith("_") for p in parts[1:]):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {name}")
    assert offenders == []


def _lazy_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_torch_code_never_imports_lightning():
    torch_only = ["losses", "functional", "compression", "models", "objective", "teachers"]
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for folder in torch_only
        for p in (PACKAGE / folder).rglob("*.py")
        if any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in _lazy_imports(p))
    ]
    assert offenders == []


def test_no_package_file_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}
