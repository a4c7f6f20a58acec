"""The study figure explains itself: legends (read back from the figure object), labelled
baseline lines, learning curves with mean and band over seeds, and a visible quick-check mark."""

from __future__ import annotations

import math
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kd_lightning.bench.plots import (  # noqa: E402
    QUICK_CHECK_MARK,
    curves_from_results,
    mean_band,
    results_figure,
)


def _row(run, job, acc, best=None, baseline=None, params=100):
    return {
        "run": run,
        "job_type": job,
        "acc_last_mean": acc,
        "acc_last_std": 1.0,
        "acc_best_val_mean": best,
        "acc_best_val_std": 0.5 if best is not None else None,
        "baseline": baseline,
        "params": params,
    }


ROWS = [
    _row("teacher", "teacher", 98.0, 98.5, params=5000),
    _row("alone", "baseline", 91.0, 92.0),
    _row("kd", "distill", 94.0, 95.0, baseline="alone", params=60),
]
# Two seeds of "kd": epochs 1-2 in both, epoch 3 reached by one seed only.
RESULTS = [
    {"run": "kd", "val_acc_curve": [[1, 0.5], [2, 0.7], [3, 0.8]]},
    {"run": "kd", "val_acc_curve": [[1, 0.7], [2, 0.9]]},
    {"run": "alone", "val_acc_curve": [[1, 0.6], [2, 0.65]]},
    {"run": "teacher"},  # a result written before curves were recorded: left out
]


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_mean_band_by_hand():
    points = mean_band(curves_from_results(RESULTS)["kd"])
    assert [p[0] for p in points] == [1, 2, 3] and [p[3] for p in points] == [2, 2, 1]
    assert points[0][1] == pytest.approx(0.6) and points[1][1] == pytest.approx(0.8)
    # sample std of {0.5, 0.7} and of {0.7, 0.9}: |a - b| / sqrt(2)
    assert points[0][2] == pytest.approx(0.2 / math.sqrt(2))
    assert points[1][2] == pytest.approx(statistics.stdev([0.7, 0.9]))
    assert points[2][1:3] == pytest.approx((0.8, 0.0))


def test_legends_baseline_lines_and_learning_curves():
    fig = results_figure(ROWS, "digits", curves=curves_from_results(RESULTS))
    try:
        bars, curves, sizes = fig.axes
        assert _legend(bars) == [
            "teacher",
            "student alone",
            "distilled",
            "last epoch",
            "best-val epoch",
            "baseline alone: 91.00%",
        ]
        baseline_lines = [line for line in bars.get_lines() if line.get_linestyle() == ":"]
        assert [line.get_xdata()[0] for line in baseline_lines] == [91.0]
        assert "alone" in [t.get_text() for t in bars.texts]  # the line's own label
        assert _legend(curves) == ["alone (1 seed)", "kd (2 seeds)"]
        kd = next(line for line in curves.get_lines() if line.get_label() == "kd (2 seeds)")
        assert list(kd.get_xdata()) == [1, 2, 3]
        assert list(kd.get_ydata()) == pytest.approx([60.0, 80.0, 80.0])
        # the band spans mean ± std: at epoch 1, 60 ± 14.14
        band = curves.collections[1].get_paths()[0].vertices
        assert band[:, 1].max() == pytest.approx(80.0 + 100 * 0.2 / math.sqrt(2))
        assert _legend(sizes) == ["teacher", "student alone", "distilled"]
        assert not [t for t in fig.texts if QUICK_CHECK_MARK in t.get_text()]
    finally:
        plt.close(fig)


def test_quick_check_is_marked_on_the_figure():
    fig = results_figure(ROWS[:2], "digits", quick_check="--set trainer.max_epochs=1")
    try:
        assert len(fig.axes) == 1  # no curves recorded, one student size: bars only
        assert fig._suptitle.get_text() == (
            f"{QUICK_CHECK_MARK}, not the study's result: --set trainer.max_epochs=1"
        )
        assert [t.get_text() for t in fig.texts if t is not fig._suptitle] == [QUICK_CHECK_MARK]
    finally:
        plt.close(fig)
