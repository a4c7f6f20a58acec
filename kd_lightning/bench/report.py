"""The study table (Markdown + CSV) and figure (PNG, :mod:`kd_lightning.bench.plots`).

Two accuracies, labelled as such, because they answer different questions:

- **last epoch**: the test accuracy of the weights training ended with. Nothing was selected
  on held-out data; this is the honest number and the one the table sorts its story on.
- **best-val epoch**: the test accuracy of the weights from the epoch with the best
  *validation* accuracy. Where the validation split is the test split (the CIFAR protocol of
  CRD/RepDistiller validates on the test set), that selection is made on the test set, which
  is what "best epoch" numbers in many papers are; the table marks such rows with ``†``.

Each is the mean ± sample standard deviation over the seeds. ``Δ`` is the difference of the
means to the run's baseline (usually the student trained alone with the same labels).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from kd_lightning.bench.files import atomic_path, atomic_write_text
from kd_lightning.bench.plots import QUICK_CHECK_MARK, Curves, plot

RESULTS_MD, RESULTS_CSV, RESULTS_PNG = "results.md", "results.csv", "results.png"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _percent(results: list[dict[str, Any]], key: str) -> list[float]:
    return [100 * r[key] for r in results if r.get(key) is not None]


def summarise(
    results: list[dict[str, Any]],
    order: list[str],
    baselines: dict[str, str | None] | None = None,
    published: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per run name (in ``order``): mean and std over seeds, deltas, published figures.

    Args:
        results: one dict per (run, seed), as written to ``result.json``.
        order: run names in table order.
        baselines: run name -> the run its ``delta`` is measured against.
        published: run name -> ``{"test_acc": <percent>, "source": ...}``.
    """
    baselines, published = baselines or {}, published or {}
    rows: list[dict[str, Any]] = []
    for name in order:
        group = [r for r in results if r["run"] == name]
        if not group:
            continue
        last_mean, last_std = mean_std(_percent(group, "test_acc"))
        best = _percent(group, "test_acc_best_val")
        best_mean, best_std = mean_std(best) if best else (None, None)
        agreement = _percent(group, "agreement")
        latency = [r["latency_ms"] for r in group if r.get("latency_ms") is not None]
        row: dict[str, Any] = {
            "run": name,
            "method": group[0]["method"],
            "job_type": group[0].get("job_type", ""),
            "labeled_fraction": group[0].get("labeled_fraction"),
            "seeds": len(group),
            "acc_last_mean": round(last_mean, 2),
            "acc_last_std": round(last_std, 2),
            "acc_best_val_mean": None if best_mean is None else round(best_mean, 2),
            "acc_best_val_std": None if best_std is None else round(best_std, 2),
            "val_is_test": bool(group[0].get("val_is_test", False)),
            "baseline": baselines.get(name),
            "delta_last": None,
            "delta_best_val": None,
            "agreement_mean": round(statistics.fmean(agreement), 2) if agreement else None,
            "agreement_with": group[0].get("agreement_with"),
            "params": group[0]["params"],
            "latency_ms": round(statistics.median(latency), 4) if latency else None,
            "seconds_per_run": round(statistics.fmean(r["seconds"] for r in group), 1),
        }
        if name in published:
            row["published_acc"] = published[name].get("test_acc")
            row["published_source"] = published[name].get("source", "")
        rows.append(row)
    by_name = {r["run"]: r for r in rows}
    for row in rows:
        base = by_name.get(row["baseline"] or "")
        if base is None or base is row:
            row["baseline"] = None if base is row else row["baseline"]
            continue
        row["delta_last"] = round(row["acc_last_mean"] - base["acc_last_mean"], 2)
        if row["acc_best_val_mean"] is not None and base["acc_best_val_mean"] is not None:
            row["delta_best_val"] = round(row["acc_best_val_mean"] - base["acc_best_val_mean"], 2)
    if any("published_acc" in r for r in rows):
        for row in rows:
            row.setdefault("published_acc", None)
            row.setdefault("published_source", "")
            ours = row["acc_best_val_mean"] if row["val_is_test"] else row["acc_last_mean"]
            row["ours_minus_published"] = (
                None if row["published_acc"] is None or ours is None
                else round(ours - row["published_acc"], 2)
            )  # fmt: skip
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    return "" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def format_markdown(
    rows: list[dict[str, Any]],
    title: str,
    notes: list[str] | None = None,
    quick_check: str | None = None,
) -> str:
    """The study table as Markdown, with a legend under it (and a quick-check banner)."""
    with_published = any("published_acc" in r for r in rows)
    header = [
        "run", "method", "job", "labels", "test acc % last epoch", "test acc % best-val epoch",
        "Δ last vs baseline", "Δ best-val vs baseline", "agreement w/ teacher %", "params",
        "CPU ms/sample", "seeds", "s/run",
    ]  # fmt: skip
    if with_published:
        header += ["published %", "ours − published"]
    align = ["---"] * 3 + ["---:"] * (len(header) - 3)
    lines = [f"## Study: {title}", ""]
    if quick_check:
        lines[0] += f" ({QUICK_CHECK_MARK.lower()})"
        lines += [
            f"> **{QUICK_CHECK_MARK}, not the study's result**: {quick_check}. The study's own "
            "table is written by the same command without `--set` and with the file's seeds.",
            "",
        ]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
    ]
    for r in rows:
        labeled = "" if r["labeled_fraction"] is None else f"{r['labeled_fraction']:g}"
        best = _pm(r["acc_best_val_mean"], r["acc_best_val_std"])
        if best and r["val_is_test"]:
            best += " †"
        cells = [
            r["run"],
            r["method"],
            r["job_type"],
            labeled,
            _pm(r["acc_last_mean"], r["acc_last_std"]),
            best,
            _signed(r["delta_last"]),
            _signed(r["delta_best_val"]),
            "" if r["agreement_mean"] is None else f"{r['agreement_mean']:.2f}",
            f"{r['params']:,}",
            "" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}",
            str(r["seeds"]),
            str(r["seconds_per_run"]),
        ]
        if with_published:
            cells += [
                "" if r.get("published_acc") is None else f"{r['published_acc']:.2f}",
                _signed(r.get("ours_minus_published")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = sorted({r["baseline"] for r in rows if r["baseline"]})
    legend = [
        "",
        "Mean ± std over seeds. *last epoch*: test accuracy of the final weights (no selection). "
        "*best-val epoch*: test accuracy of the weights from the epoch with the best validation "
        "accuracy"
        + (
            "; † the validation split is the test split, so this selects on the test set (the "
            "optimistic 'best epoch' figure many papers report)."
            if any(r["val_is_test"] for r in rows)
            else " (validation and test splits are disjoint)."
        ),
        "Δ: difference of means to the row's baseline"
        + (f" ({', '.join(baselines)})." if baselines else "."),
        "agreement: top-1 agreement with the run's teacher on the test split (the study's "
        "reference teacher for runs without one). CPU ms/sample: student forward on one sample, "
        "warm, median of repeats (median over seeds).",
    ]
    if with_published:
        legend.append(
            "published: the paper's figure (source in results.csv); ours − published compares "
            "the published figure with our best-val column where validation is the test set "
            "(the papers' protocol), else with our last-epoch column."
        )
    lines += legend + list(notes or [])
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the rows as CSV (atomically), columns in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic_path(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or ["run"])
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read ``results.csv`` back with numbers as numbers (for notebooks)."""
    rows = []
    with Path(path).open() as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif value in ("True", "False"):
                    row[key] = value == "True"
                else:
                    try:
                        number = float(value)
                        row[key] = (
                            int(number) if number.is_integer() and "." not in value else number
                        )
                    except ValueError:
                        row[key] = value
            rows.append(row)
    return rows


def write_report(
    rows: list[dict[str, Any]],
    output_dir: Path,
    title: str,
    notes: list[str] | None = None,
    echo: bool = True,
    curves: Curves | None = None,
    quick_check: str | None = None,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and ``results.png`` (each atomically); print the table.

    Args:
        rows: from :func:`summarise`.
        output_dir: the folder of the three files.
        title: the study's name.
        notes: lines under the Markdown table.
        echo: print the table and the paths.
        curves: per-seed validation curves for the figure's learning-curve panel.
        quick_check: how this run differs from the study file (``--set ...``); marks the
            Markdown title, a ``quick_check`` CSV column and the figure.
    """
    markdown = format_markdown(rows, title, notes, quick_check=quick_check)
    paths = {"markdown": output_dir / RESULTS_MD, "csv": output_dir / RESULTS_CSV}
    atomic_write_text(paths["markdown"], markdown)
    marked = [{**row, "quick_check": quick_check} for row in rows] if quick_check else rows
    write_csv(marked, paths["csv"])
    png = plot(rows, output_dir / RESULTS_PNG, title, curves=curves, quick_check=quick_check)
    if png is not None:
        paths["png"] = png
    if echo:
        print()
        print(markdown)
        print("written: " + ", ".join(str(p) for p in paths.values()), flush=True)
    return paths
