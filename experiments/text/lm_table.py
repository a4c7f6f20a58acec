"""The causal-LM perplexity table of ``lm_study.yaml``: Markdown, CSV and a figure.

``kd-lightning study experiments/text/lm_study.yaml`` (from the repository root) trains the runs
into ``results/lm/runs`` (not committed) and writes each ``result.json`` (with ``val_perplexity`` and ``test_perplexity``: next-token, exp of the mean
token negative log-likelihood, see ``kd_lightning.bench.evaluate``); its own ``results.md`` is
the token-accuracy table. This script reads those ``result.json`` files and writes
``perplexity.csv``, ``perplexity.md`` and ``perplexity.png`` to ``experiments/text/results/lm``
(committed), with a copy of the study's ``results.*``::

    python experiments/text/lm_table.py                       # the table and the figure
    python experiments/text/lm_table.py --docs docs/transformers.md           # + the docs block
    python experiments/text/lm_table.py --docs docs/transformers.md --check   # docs up to date?

The docs block sits between ``<!-- lm-perplexity: <csv path> -->`` and
``<!-- /lm-perplexity -->`` and is rewritten from the CSV, never typed by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STUDY = HERE / "lm_study.yaml"
BEGIN, END = "<!-- lm-perplexity: {} -->", "<!-- /lm-perplexity -->"
LABELS = {
    "teacher": "teacher (GPT-2, 4 x 264)",
    "student_alone": "student alone (GPT-2, 2 x 128)",
    "forward_kl": "student + forward KL",
    "reverse_kl": "student + reverse KL",
    "jsd": "student + JSD (beta 0.5)",
    "forward_kl_topk": "student + forward KL, top-64 cache",
    "forward_kl_sampled": "student + forward KL, sampled-64 cache",
}
FIELDS = ["run", "label", "seeds", "params", "val_ppl", "val_ppl_sd", "test_ppl", "test_ppl_sd",
          "test_ppl_vs_alone_pct", "test_ppl_vs_dense_pct", "next_token_acc",
          "agreement_with_teacher", "seconds"]  # fmt: skip


COMMITTED = HERE / "results" / "lm"


def study_runs(study: Path) -> tuple[list[str], Path]:
    """Run names in the study's order and its output folder (relative to the repository root,
    where the study runs: the configs' tokenizer path is relative to it too)."""
    spec = yaml.safe_load(study.read_text())
    return [r["name"] for r in spec["runs"]], ROOT / spec["output_dir"]


def rows(study: Path = STUDY) -> list[dict]:
    """One row per finished run: mean (and sample sd) over its seeds."""
    names, out = study_runs(study)
    table = []
    for name in names:
        results = [
            json.loads(p.read_text()) for p in sorted(out.glob(f"runs/{name}/seed*/result.json"))
        ]
        results = [r for r in results if r.get("test_perplexity") is not None]
        if not results:
            continue

        def stat(key: str, results=results) -> tuple[float, float | None]:
            values = [r[key] for r in results]
            sd = statistics.stdev(values) if len(values) > 1 else None
            return statistics.fmean(values), sd

        val, val_sd = stat("val_perplexity")
        test, test_sd = stat("test_perplexity")
        agreement = [r["agreement"] for r in results if r.get("agreement") is not None]
        table.append({
            "run": name, "label": LABELS.get(name, name), "seeds": len(results),
            "params": results[0]["params"], "val_ppl": round(val, 2),
            "val_ppl_sd": None if val_sd is None else round(val_sd, 2), "test_ppl": round(test, 2),
            "test_ppl_sd": None if test_sd is None else round(test_sd, 2),
            "test_ppl_vs_alone_pct": None, "test_ppl_vs_dense_pct": None,
            "next_token_acc": round(100 * stat("test_acc")[0], 2),
            "agreement_with_teacher": round(100 * statistics.fmean(agreement), 2) if agreement else None,
            "seconds": round(statistics.fmean(r["seconds"] for r in results), 1),
        })  # fmt: skip
    alone = next((r for r in table if r["run"] == "student_alone"), None)
    dense = next((r for r in table if r["run"] == "forward_kl"), None)
    for row in table:
        if alone is not None and row["run"] not in ("teacher", "student_alone"):
            row["test_ppl_vs_alone_pct"] = round(100 * (row["test_ppl"] / alone["test_ppl"] - 1), 2)
        if dense is not None and row["run"].startswith("forward_kl_"):  # a cache's teacher
            row["test_ppl_vs_dense_pct"] = round(100 * (row["test_ppl"] / dense["test_ppl"] - 1), 2)
    return table


def _cell(value, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(table: list[dict]) -> str:
    """The table as Markdown (no ``±``: a sample sd, when there are seeds, has its own column)."""
    sd = any(r["seeds"] > 1 for r in table)
    head = ["run", "params", "val ppl", "test ppl", "test ppl vs alone",
            "test ppl vs dense forward KL", "next-token acc %",
            "top-1 agreement with teacher %"]  # fmt: skip
    if sd:
        head[4:4] = ["test ppl sd"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in table:
        cells = [r["label"], f"{int(r['params']):,}", f"{r['val_ppl']:.2f}", f"{r['test_ppl']:.2f}",
                 _cell(r["test_ppl_vs_alone_pct"], "{:+.2f}%"),
                 _cell(r["test_ppl_vs_dense_pct"], "{:+.2f}%"), f"{r['next_token_acc']:.2f}",
                 _cell(r["agreement_with_teacher"], "{:.2f}")]  # fmt: skip
        if sd:
            cells[4:4] = [_cell(r["test_ppl_sd"], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seeds"] for r in table})
    lines += ["", f"*Seeds per run: {', '.join(map(str, seeds))}; perplexity = exp of the mean "
              "next-token negative log-likelihood on the BBC News validation / test articles "
              "(4096-token BPE); from `experiments/text/results/lm/perplexity.csv`.*"]  # fmt: skip
    return "\n".join(lines) + "\n"


def write(table: list[dict], out: Path) -> None:
    with (out / "perplexity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(table)
    (out / "perplexity.md").write_text("# Causal LM on BBC News: perplexity\n\n" + markdown(table))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [r["label"] for r in table]
    ax.barh(labels, [r["test_ppl"] for r in table], color="tab:blue", label="test")
    ax.scatter([r["val_ppl"] for r in table], labels, color="black", zorder=3, label="validation")
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)


def docs_block(doc: str, csv_path: str, table_md: str) -> str:
    """``doc`` with its lm-perplexity block rewritten to ``table_md``."""
    begin = BEGIN.format(csv_path)
    if begin not in doc or END not in doc:
        raise SystemExit(
            f"the doc has no `{begin}` ... `{END}` block; add one where the table goes"
        )
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{begin}\n{table_md}{END}{tail}"


def read_csv_rows(path: Path) -> list[dict]:
    """perplexity.csv back as rows, numbers as numbers."""
    out = []
    for row in csv.DictReader(path.open()):
        out.append({k: (row[k] if k in ("run", "label") else (float(row[k]) if row[k] else None))
                    for k in FIELDS})  # fmt: skip
        out[-1]["seeds"] = int(out[-1]["seeds"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", help="a Markdown page with an lm-perplexity block to rewrite")
    parser.add_argument("--check", action="store_true", help="only check the docs block")
    args = parser.parse_args(argv)
    _, study_out = study_runs(STUDY)
    csv_file = COMMITTED / "perplexity.csv"
    if not args.check:
        table = rows()
        if not table:
            raise SystemExit(
                f"no finished run with a perplexity under {study_out}/runs; run the study"
            )
        COMMITTED.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.csv", "results.png"):
            if (study_out / name).is_file():
                shutil.copyfile(study_out / name, COMMITTED / name)
        write(table, COMMITTED)
        print(markdown(table))
    if args.docs:
        page = Path(args.docs)
        text = page.read_text()
        new = docs_block(text, str(csv_file.relative_to(ROOT)), markdown(read_csv_rows(csv_file)))
        if args.check:
            print("up to date" if new == text else f"{page} differs: run without --check")
            return int(new != text)
        page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
