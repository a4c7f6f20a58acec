"""The study package's layout: no module imports the CLI (not even inside a function), so the
CLI -> study edge is the only one between them; every module stays under 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import kd_lightning.bench as bench

BENCH = Path(bench.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_bench_module_imports_the_cli():
    for path in sorted(BENCH.glob("*.py")):
        imported = _imported_modules(path)
        # `kd_lightning.cli_errors` (the shared error printing) is fine; `kd_lightning.cli` not.
        assert not {
            n for n in imported if n == "kd_lightning.cli" or n.startswith("kd_lightning.cli.")
        }, path.name


def test_every_bench_module_is_at_most_500_lines():
    for path in sorted(BENCH.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_a_bench_module_that_imported_the_cli_would_be_caught(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("def f():\n    from kd_lightning.cli import build_cli\n")
    assert "kd_lightning.cli" in _imported_modules(offender)
