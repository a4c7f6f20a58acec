"""The bar panel's legend and baseline labels never cover a bar: measured on the drawn figure
(constrained layout applied), with many rows and baselines close together."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kd_lightning.bench.plots import results_figure  # noqa: E402


def _row(run, job, acc, baseline=None):
    return {"run": run, "job_type": job, "acc_last_mean": acc, "acc_last_std": 0.5,
            "acc_best_val_mean": acc - 0.3, "acc_best_val_std": 0.4, "baseline": baseline,
            "params": 100}  # fmt: skip


def _rows(n_distilled: int) -> list[dict]:
    rows = [_row("teacher", "teacher", 99.6), _row("alone", "baseline", 97.0),
            _row("alone_wide", "baseline", 97.2), _row("alone@10%", "baseline", 91.2)]  # fmt: skip
    base = ["alone", "alone_wide", "alone@10%"]
    rows += [_row(f"kd{i}", "distill", 90 + i % 9, base[i % 3]) for i in range(n_distilled)]
    return rows


def _drawn(rows):
    fig = results_figure(rows, "digits")
    fig.canvas.draw()
    return fig, fig.axes[0], fig.canvas.get_renderer()


def test_legend_and_baseline_labels_stay_off_the_bars():
    for n in (3, 40):  # a short and a tall panel
        fig, ax, renderer = _drawn(_rows(n))
        try:
            panel = ax.bbox  # every bar is inside the panel
            axis = ax.xaxis.get_tightbbox(renderer)  # tick labels and the x-axis label
            legend = ax.get_legend().get_window_extent(renderer)
            assert legend.y1 <= axis.y0 + 0.5  # below the x-axis label, not over the bars
            labels = [t for t in ax.texts if t.get_rotation() == 90]
            assert labels and all(t.get_window_extent(renderer).y0 >= panel.y1 for t in labels)
            title = ax.title.get_window_extent(renderer)
            assert all(title.y0 >= t.get_window_extent(renderer).y1 - 0.5 for t in labels)
            # the close baselines 97.0 and 97.2 share one label; 91.2 has its own
            assert sorted(t.get_text() for t in labels) == ["alone, alone_wide", "alone@10%"]
            figure = fig.bbox
            assert figure.y0 <= legend.y0 and all(
                t.get_window_extent(renderer).y1 <= figure.y1 for t in labels
            )  # nothing is cut off by the figure's edge
        finally:
            plt.close(fig)
