"""The study's figure (``results.png``): what each run reached, and how it got there.

Panels, left to right:

1. **Per run**: test accuracy as bars (solid: last epoch, hatched: best-val epoch; error bars:
   std over seeds), coloured by job (teacher, baseline, distilled), with each Δ baseline drawn
   as a dotted line named just above the panel (never over a bar); the legend sits below the
   x-axis label, outside the bars.
2. **Learning curves**: validation accuracy per epoch, mean over seeds (line) and mean ± std
   (band), one curve per run.
3. **Accuracy vs size** (when the students differ in size): last-epoch accuracy against the
   parameter count.

Every panel has a matplotlib legend. A quick check (``--set``, ``--only`` or ``--seeds``) is
marked across the whole figure and in its title, so it is never mistaken for a study result.
The builders return the :class:`~matplotlib.figure.Figure`, so tests can read legends back.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from kd_lightning.bench.files import atomic_path

JOB_COLOURS = {"teacher": "#7f7f7f", "baseline": "#1f77b4", "distill": "#d62728"}
OTHER_COLOUR = "#2ca02c"
JOB_LABELS = {"teacher": "teacher", "baseline": "student alone", "distill": "distilled"}
QUICK_CHECK_MARK = "QUICK CHECK"

Curves = dict[str, list[list[tuple[int, float]]]]
"""Run name -> one learning curve per seed, each a list of ``(epoch, value)``."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def curves_from_results(results: list[dict[str, Any]]) -> Curves:
    """The per-seed validation curves recorded in ``result.json`` (``val_acc_curve``)."""
    curves: Curves = {}
    for result in results:
        curve = result.get("val_acc_curve")
        if curve:
            curves.setdefault(result["run"], []).append([(int(e), float(v)) for e, v in curve])
    return curves


def mean_band(seed_curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, int]]:
    """``(epoch, mean, std, n)`` per epoch over the seeds that reached it (std 0 for one)."""
    by_epoch: dict[int, list[float]] = {}
    for curve in seed_curves:
        for epoch, value in curve:
            by_epoch.setdefault(epoch, []).append(value)
    points = []
    for epoch in sorted(by_epoch):
        values = by_epoch[epoch]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        points.append((epoch, statistics.fmean(values), std, len(values)))
    return points


def _colour(row: dict[str, Any]) -> str:
    return JOB_COLOURS.get(row["job_type"], OTHER_COLOUR)


def _baseline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    named = {r["baseline"] for r in rows if r.get("baseline")}
    if not named:
        named = {r["run"] for r in rows if r["job_type"] == "baseline"}
    return [r for r in rows if r["run"] in named]


def _bars(ax: Any, rows: list[dict[str, Any]], title: str) -> None:
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    ys = list(range(len(rows)))[::-1]
    bar = 0.38
    colours = [_colour(r) for r in rows]
    ax.barh(
        [y + bar / 2 for y in ys],
        [r["acc_last_mean"] for r in rows],
        height=bar,
        xerr=[r["acc_last_std"] for r in rows],
        color=colours,
        capsize=2,
    )
    best = [r["acc_best_val_mean"] for r in rows]
    has_best = any(b is not None for b in best)
    if has_best:
        ax.barh(
            [y - bar / 2 for y in ys],
            [b or 0 for b in best],
            height=bar,
            xerr=[r["acc_best_val_std"] or 0 for r in rows],
            color=colours,
            alpha=0.45,
            hatch="//",
            capsize=2,
        )
    ax.set_yticks(ys, [r["run"] for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)  # no empty band: the baseline labels stand above
    low = min(r["acc_last_mean"] - r["acc_last_std"] for r in rows)
    ax.set_xlim(max(0, low - 5), 100 if low > 50 else None)
    handles: list[Any] = [
        Patch(facecolor=JOB_COLOURS[job], label=JOB_LABELS[job])
        for job in JOB_COLOURS
        if any(r["job_type"] == job for r in rows)
    ]
    if any(r["job_type"] not in JOB_COLOURS for r in rows):
        handles.append(Patch(facecolor=OTHER_COLOUR, label="other"))
    handles.append(Patch(facecolor="white", edgecolor="black", label="last epoch"))
    if has_best:
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="//", label="best-val epoch")
        )
    baselines = _baseline_rows(rows)
    for row in baselines:
        value = row["acc_last_mean"]
        handles.append(
            ax.axvline(
                value,
                color=_colour(row),
                ls=":",
                lw=1.0,
                label=f"baseline {row['run']}: {value:.2f}%",
            )
        )
    ax.set_xlabel("test accuracy % (mean ± std over seeds)")
    labels = _label_baselines(ax, baselines)
    renderer = ax.figure.canvas.get_renderer()
    # The baseline labels stand above the axes (never over a bar); the title goes above them.
    above = max((_points(ax, t.get_window_extent(renderer).height) for t in labels), default=0)
    ax.set_title(f"{title}: test accuracy per run", pad=6 + above)
    # The legend goes below the x-axis label (an offset in points, whatever the panel's height).
    axis = ax.xaxis.get_tightbbox(renderer)
    below = _points(ax, ax.bbox.y0 - axis.y0) if axis is not None else 30.0
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=offset_copy(ax.transAxes, fig=ax.figure, y=-(below + 4), units="points"),
        ncol=3,
        fontsize=7,
        frameon=False,
    )


def _points(ax: Any, pixels: float) -> float:
    return pixels * 72.0 / ax.figure.dpi


def _label_baselines(ax: Any, baselines: list[dict[str, Any]]) -> list[Any]:
    """Name each baseline line just above the axes, outside the bars; baselines closer than
    1.5% of the x-range share one label (the legend gives each value)."""
    low, high = ax.get_xlim()
    close = 0.015 * (high - low)
    groups: list[list[dict[str, Any]]] = []
    for row in sorted(baselines, key=lambda r: r["acc_last_mean"]):
        if groups and row["acc_last_mean"] - groups[-1][-1]["acc_last_mean"] < close:
            groups[-1].append(row)
        else:
            groups.append([row])
    texts = []
    for group in groups:
        value = statistics.fmean(r["acc_last_mean"] for r in group)
        texts.append(
            ax.annotate(
                ", ".join(r["run"] for r in group),
                (value, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 2),
                textcoords="offset points",
                rotation=90,
                va="bottom",
                ha="center",
                fontsize=7,
                color=_colour(group[0]),
                annotation_clip=False,
            )
        )
    return texts


def _learning_curves(ax: Any, rows: list[dict[str, Any]], curves: Curves) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    palette = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    shown = [r["run"] for r in rows if r["run"] in curves]
    for i, run in enumerate(shown):
        points = mean_band(curves[run])
        epochs = [p[0] for p in points]
        mean = [100 * p[1] for p in points]
        std = [100 * p[2] for p in points]
        colour = palette(i % palette.N)
        seeds = len(curves[run])
        ax.plot(
            epochs, mean, color=colour, lw=1.4, label=f"{run} ({seeds} seed{'s' * (seeds > 1)})"
        )
        ax.fill_between(
            epochs,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=colour,
            alpha=0.2,
            lw=0,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("learning curves: mean over seeds, band ± std")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(shown) > 6:  # many runs: the legend beside the panel, not over the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    elif shown:
        ax.legend(loc="lower right", fontsize=7, framealpha=0.85)


def _sizes(ax: Any, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ax.errorbar(
            row["params"],
            row["acc_last_mean"],
            yerr=row["acc_last_std"],
            fmt="o",
            color=_colour(row),
            capsize=2,
        )
        ax.annotate(
            row["run"],
            (row["params"], row["acc_last_mean"]),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=7,
            alpha=0.8,
        )
    from matplotlib.lines import Line2D

    jobs = [j for j in JOB_COLOURS if any(r["job_type"] == j for r in rows)]
    ax.legend(
        handles=[
            Line2D([], [], marker="o", ls="", color=JOB_COLOURS[j], label=JOB_LABELS[j])
            for j in jobs
        ],
        loc="lower right",
        fontsize=7,
    )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy % (last epoch)")
    ax.set_title("accuracy vs model size")


def results_figure(
    rows: list[dict[str, Any]],
    title: str,
    curves: Curves | None = None,
    quick_check: str | None = None,
) -> Any:
    """The study figure (see the module docstring); ``quick_check`` says how it differs from
    the study file. Returns the matplotlib Figure (close it with ``plt.close(fig)``)."""
    if not rows:
        raise ValueError("no rows to plot: the study has no results yet")
    plt = _pyplot()
    curves = {k: v for k, v in (curves or {}).items() if any(v)}
    sizes = {r["params"] for r in rows if r["job_type"] != "teacher"}
    kinds = ["bars"] + (["curves"] if curves else []) + (["sizes"] if len(sizes) > 1 else [])
    height = max(4.2, 0.35 * len(rows) + 2.4)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(7.5 * len(kinds), height), squeeze=False, constrained_layout=True
    )
    panels = dict(zip(kinds, axes[0], strict=True))
    _bars(panels["bars"], rows, title)
    if "curves" in panels:
        _learning_curves(panels["curves"], rows, curves)
    if "sizes" in panels:
        _sizes(panels["sizes"], rows)
    if quick_check:
        fig.suptitle(f"{QUICK_CHECK_MARK}, not the study's result: {quick_check}", color="#b00020")
        fig.text(
            0.5,
            0.5,
            QUICK_CHECK_MARK,
            rotation=20,
            fontsize=48,
            color="#b00020",
            alpha=0.18,
            ha="center",
            va="center",
            weight="bold",
        )
    return fig


def plot(
    rows: list[dict[str, Any]],
    path: Path,
    title: str,
    curves: Curves | None = None,
    quick_check: str | None = None,
) -> Path | None:
    """Write :func:`results_figure` to ``path`` (atomically); ``None`` when there are no rows."""
    if not rows:
        return None
    fig = results_figure(rows, title, curves, quick_check)
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=110)
    finally:
        _pyplot().close(fig)
    return path
