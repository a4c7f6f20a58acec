"""Results tables in the Markdown docs, generated from committed study outputs.

A figure quoted in ``README.md`` or ``docs/`` is never typed by hand: it sits in a block whose
opening HTML comment names the study's ``results.csv`` (path from the repository root), the
columns and the rows (run name of the study -> label in the doc)::

    <!-- table: experiments/digits/results/digits-core/results.csv
    columns: [labels, test_acc, agreement]
    rows:
      teacher: teacher (SmallCNN)
      hinton_kd@10%: Hinton KD
    -->
    (generated table)
    <!-- /table -->

``python -m kd_lightning.bench.docs_tables`` rewrites every block from its CSV;
``--check`` only reports the blocks that differ (``tests/test_docs_figures.py`` runs it).
Rendered Markdown hides the comments.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.bench.report import read_csv

REGENERATE = "python -m kd_lightning.bench.docs_tables"
END_MARKER = "<!-- /table -->"
_BLOCK = re.compile(
    r"^<!-- table: (?P<spec>.*?)-->\n(?P<body>.*?)^" + re.escape(END_MARKER), re.S | re.M
)
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
FIGURE = re.compile(r"\d+\.\d+ ?(?:±|\+-|\+/-) ?\d+\.\d+")
"""A quoted study figure (``mean ± std``); outside generated blocks the docs must not have one."""


def _mean_std(row: dict[str, Any], prefix: str) -> str:
    mean, std = row.get(f"{prefix}_mean"), row.get(f"{prefix}_std")
    return "" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _labels(row: dict[str, Any]) -> str:
    fraction = row.get("labeled_fraction")
    return "" if fraction is None else f"{100 * fraction:g}%"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


COLUMNS = {
    "labels": ("labels", _labels),
    "test_acc": ("test acc %", lambda r: _mean_std(r, "acc_last")),
    "best_val": ("test acc % (best-val epoch)", lambda r: _mean_std(r, "acc_best_val")),
    "delta": ("Δ vs baseline", lambda r: _signed(r.get("delta_last"))),
    "baseline": ("baseline", lambda r: r.get("baseline") or ""),
    "agreement": (
        "agreement %",
        lambda r: "" if r.get("agreement_mean") is None else f"{r['agreement_mean']:.2f}",
    ),
    "params": ("params", lambda r: f"{int(r['params']):,}"),
    "seeds": ("seeds", lambda r: str(r["seeds"])),
}
"""Column name -> (header, cell of one results.csv row). ``test_acc`` is the last epoch's."""


@dataclass
class Block:
    """One generated block of a Markdown file."""

    source: str
    columns: list[str]
    rows: dict[str, str]
    body_start: int
    body_end: int


class DocsTableError(ValueError):
    """A block that cannot be generated; the message names the file and the fix."""


def _fenced(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _FENCE.finditer(text)]


def parse_blocks(text: str, where: str = "<text>") -> list[Block]:
    """Every block of ``text`` (a line starting ``<!-- table:``) outside code fences, checked."""
    fences = _fenced(text)
    outside = [m for m in _BLOCK.finditer(text) if not any(a <= m.start() < b for a, b in fences)]
    opened = [
        i for i in (m.start() for m in re.finditer("^<!-- table:", text, re.M))
        if not any(a <= i < b for a, b in fences)
    ]  # fmt: skip
    if len(opened) != len(outside):
        raise DocsTableError(f"{where}: a `<!-- table: ... -->` block lacks its `{END_MARKER}`")
    blocks = []
    for match in outside:
        line = text.count("\n", 0, match.start()) + 1
        place = f"{where}:{line}"
        try:
            head, _, rest = match["spec"].partition("\n")
            spec = yaml.safe_load(rest) or {}
        except yaml.YAMLError as error:
            raise DocsTableError(
                f"{place}: the table spec is not YAML (quote a label that holds ': '): {error}"
            ) from None
        source = head.strip()
        if not source.endswith(".csv"):
            raise DocsTableError(f"{place}: `table:` must name a results.csv, got {source!r}")
        columns = spec.get("columns") if isinstance(spec, dict) else None
        rows = spec.get("rows") if isinstance(spec, dict) else None
        if not isinstance(columns, list) or not columns:
            raise DocsTableError(f"{place}: give `columns: [...]`, a list of {sorted(COLUMNS)}")
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise DocsTableError(f"{place}: unknown columns {unknown}; valid: {sorted(COLUMNS)}")
        if not isinstance(rows, dict) or not rows:
            raise DocsTableError(f"{place}: give `rows:`, a mapping of run name -> label")
        blocks.append(
            Block(
                source=source,
                columns=columns,
                rows={str(k): str(v) for k, v in rows.items()},
                body_start=match.start("body"),
                body_end=match.end("body"),
            )
        )
    return blocks


def read_source(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of a study's ``results.csv`` by run name; quick checks are refused."""
    if not path.is_file():
        raise DocsTableError(
            f"{path} not found: run the study and copy its results.csv and results.md there"
        )
    rows = read_csv(path)
    if any(row.get("quick_check") for row in rows):
        raise DocsTableError(
            f"{path} is a quick check (--set or foreign seeds), not a study result; copy the "
            "study's own results.csv"
        )
    return {row["run"]: row for row in rows}


def render(block: Block, rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown of one block: the table and a line naming its source and seeds."""
    missing = [name for name in block.rows if name not in rows]
    if missing:
        raise DocsTableError(f"{block.source} has no run {missing}; its runs are {sorted(rows)}")
    headers = ["run"] + [COLUMNS[c][0] for c in block.columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(block.columns),
    ]
    for name, label in block.rows.items():
        cells = [label] + [COLUMNS[c][1](rows[name]) for c in block.columns]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({int(rows[name]["seeds"]) for name in block.rows})
    count = " or ".join(str(s) for s in seeds)
    lines += [
        "",
        f"*{count} seeds, mean ± std, test accuracy of the last epoch; from `{block.source}`.*",
    ]
    return "\n".join(lines) + "\n"


def regenerate(text: str, root: Path, where: str = "<text>") -> str:
    """``text`` with every block rewritten from its source CSV (paths relative to ``root``)."""
    pieces, position = [], 0
    for block in parse_blocks(text, where):
        rows = read_source(root / block.source)
        pieces += [text[position : block.body_start], render(block, rows)]
        position = block.body_end
    return "".join(pieces) + text[position:]


def outside_blocks(text: str) -> str:
    """``text`` without the generated blocks (what a person typed)."""
    return _BLOCK.sub("", text)


def doc_files(root: Path) -> list[Path]:
    """``README.md`` and every Markdown file under ``docs/``."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted((root / "docs").rglob("*.md"))


def check(files: Iterable[Path], root: Path) -> list[str]:
    """One line per file whose blocks differ from their sources, or that quotes a figure by hand."""
    problems = []
    for path in files:
        text = path.read_text()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if regenerate(text, root, name) != text:
            problems.append(f"{name}: a table differs from its results.csv; run `{REGENERATE}`")
        typed = FIGURE.findall(outside_blocks(text))
        if typed:
            problems.append(
                f"{name}: figures outside a generated table {typed}; put them in a "
                "`<!-- table: ... -->` block"
            )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REGENERATE, description="Regenerate the results tables of README.md and docs/."
    )
    parser.add_argument("files", nargs="*", type=Path, help="default: README.md and docs/**/*.md")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root")
    parser.add_argument("--check", action="store_true", help="report differences, write nothing")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = [f.resolve() for f in args.files] or doc_files(root)
    try:
        if args.check:
            problems = check(files, root)
            for line in problems:
                print(line)
            return 1 if problems else 0
        for path in files:
            text = path.read_text()
            new = regenerate(text, root, str(path))
            if new != text:
                path.write_text(new)
                print(f"updated {path}")
    except DocsTableError as error:
        print(f"{REGENERATE}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
