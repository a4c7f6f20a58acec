"""Every figure of docs/on_policy.md is a copy of a committed result file, never typed by hand.

The page quotes the table ``experiments/text/results/onpolicy/results.md`` (written by that
folder's ``run.py`` from its ``results.csv``) and the benchmark output ``on_policy_step.txt``
between ``<!-- copy: PATH -->`` and ``<!-- /copy -->`` markers; both must equal their files, and
the table's means must equal the means of the CSV's rows.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "on_policy.md"
RESULTS = ROOT / "experiments" / "text" / "results" / "onpolicy"
COPY = re.compile(r"<!-- copy: (?P<path>\S+) -->\n(?P<body>.*?)<!-- /copy -->", re.S)


def _copies() -> dict[str, str]:
    return {m["path"]: m["body"] for m in COPY.finditer(PAGE.read_text())}


def test_quoted_blocks_equal_their_files():
    copies = _copies()
    assert copies, "docs/on_policy.md quotes no result file"
    for path, body in copies.items():
        text = (ROOT / path).read_text()
        assert body.strip("`\n") == text.strip("\n"), path


def test_table_means_are_the_csv_means():
    rows = list(csv.DictReader((RESULTS / "results.csv").open()))
    table = (RESULTS / "results.md").read_text().splitlines()[2:]
    by_label = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table}
    labels = {
        "teacher": "teacher (reference)",
        "onpolicy_gkd": "on-policy GKD (lmbda 0.5, JSD 0.5)",
    }
    for run, label in labels.items():
        mine = [r for r in rows if r["run"] == run]
        cells = by_label[label]
        assert int(cells[1]) == len(mine)
        perplexity = statistics.mean(float(r["val_perplexity"]) for r in mine)
        nll = statistics.mean(float(r["teacher_nll"]) for r in mine)
        assert cells[2] == f"{perplexity:.2f}" and cells[3] == f"{nll:.3f}"
