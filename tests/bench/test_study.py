"""Studies: interrupted studies resume to the uninterrupted result, the table's arithmetic, W&B.

The studies here are the digits configs cut to a few batches (``--set`` overrides), so each
run takes about a second.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from kd_lightning.bench import study as study_module
from kd_lightning.bench.callbacks import BestValSnapshot
from kd_lightning.bench.report import format_markdown, read_csv, summarise
from kd_lightning.bench.study import Study, plan_study, run_study
from kd_lightning.bench.wandb_offline import read_offline_runs, read_table

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "experiments" / "digits"
TINY = {
    "trainer.max_epochs": 3,
    "trainer.limit_train_batches": 3,
    "trainer.limit_val_batches": 2,
    "trainer.log_every_n_steps": 1,
}


def _study_file(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "tiny",
        "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "reference_teacher": "teacher",
        "baseline": "student_alone",
        "runs": [
            {"name": "teacher", "config": str(DIGITS / "teacher.yaml")},
            {"name": "student_alone", "config": str(DIGITS / "student_alone.yaml")},
            {
                "name": "hinton_kd",
                "config": str(DIGITS / "hinton_kd.yaml"),
                "needs": {"model.init_args.teacher.init_args.checkpoint_path": "teacher"},
            },
        ],
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class _CrashInSecondRun(BestValSnapshot):
    """Raises at the end of epoch 2 of the second run a study fits (after epoch 1 was saved)."""

    fits = 0

    def on_fit_start(self, trainer, pl_module):
        type(self).fits += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if type(self).fits == 2 and trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, monkeypatch, capsys):
    path = _study_file(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(study_module, "BestValSnapshot", _CrashInSecondRun)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_study(path, overrides=TINY)
    monkeypatch.undo()
    teacher_dir, student_dir = (
        next((out / "runs" / name).glob("set-*/seed0")) for name in ("teacher", "student_alone")
    )
    assert (teacher_dir / "result.json").is_file()
    assert not (student_dir / "result.json").exists()
    assert (student_dir / "last.ckpt").is_file()  # epoch 1 finished before the crash
    assert not (out / "runs" / "hinton_kd").exists()
    teacher_mtime = (teacher_dir / "final.ckpt").stat().st_mtime_ns
    capsys.readouterr()

    results = run_study(path, overrides=TINY, epoch_lines=1)
    log = capsys.readouterr().out
    assert "[1/3] teacher seed=0: done before, skipped" in log
    assert "[2/3] student_alone seed=0: resuming from" in log
    assert "[2/3] student_alone seed=0 epoch 3/3" in log  # progress line of the resumed run
    assert "[2/3] student_alone seed=0 epoch 1/3" not in log  # epoch 1 was not redone
    assert (teacher_dir / "final.ckpt").stat().st_mtime_ns == teacher_mtime
    by_run = {r["run"]: r for r in results}
    assert by_run["student_alone"]["resumed"] and not by_run["hinton_kd"]["resumed"]
    assert not (student_dir / "last.ckpt").exists()

    # Resume equals an uninterrupted run (same seed, same config) to the last digit.
    clean = run_study(path, overrides=TINY, only=["student_alone"], output_dir=tmp_path / "clean")
    clean_student = next(r for r in clean if r["run"] == "student_alone")
    for key in ("test_acc", "test_acc_best_val", "best_epoch", "best_val_acc", "last_val_acc",
                "val_acc_curve"):  # fmt: skip
        assert by_run["student_alone"][key] == clean_student[key], key

    # A third run changes nothing and trains nothing.
    again = run_study(path, overrides=TINY)
    assert all("resumed" in r for r in again)
    assert "done before, skipped" in capsys.readouterr().out
    assert (teacher_dir / "final.ckpt").stat().st_mtime_ns == teacher_mtime


def test_table_files_and_best_val_snapshot(tmp_path):
    path = _study_file(tmp_path)
    results = run_study(path, overrides=TINY, echo=False)
    rows = {r["run"]: r for r in results.rows}
    assert set(results.paths) == {"markdown", "csv", "png"}
    assert results.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kd = next(r for r in results if r["run"] == "hinton_kd")
    # The best-val epoch is the argmax of the validation accuracy logged per epoch.
    metrics = next((tmp_path / "out" / "runs" / "hinton_kd").glob("set-*/seed0/logs/metrics.csv"))
    val = [row for row in read_csv(metrics) if row.get("val/acc") is not None]
    accuracies = [row["val/acc"] for row in val]
    assert kd["best_epoch"] == accuracies.index(max(accuracies)) + 1
    assert math.isclose(kd["best_val_acc"], max(accuracies), rel_tol=1e-6)
    assert math.isclose(kd["last_val_acc"], accuracies[-1], rel_tol=1e-6)
    # The learning curve of the figure is the logged validation accuracy, epoch by epoch.
    assert [epoch for epoch, _ in kd["val_acc_curve"]] == [1, 2, 3]
    assert [v for _, v in kd["val_acc_curve"]] == pytest.approx(accuracies, rel=1e-6)
    assert kd["agreement_with"] == "teacher" and 0 <= kd["agreement"] <= 1
    assert kd["latency_ms"] > 0 and kd["params"] == rows["student_alone"]["params"]
    assert rows["hinton_kd"]["job_type"] == "distill"
    assert rows["teacher"]["job_type"] == "teacher"
    assert rows["student_alone"]["job_type"] == "baseline"
    assert rows["hinton_kd"]["delta_last"] == pytest.approx(
        rows["hinton_kd"]["acc_last_mean"] - rows["student_alone"]["acc_last_mean"], abs=0.011
    )
    csv_rows = read_csv(results.paths["csv"])
    assert [r["run"] for r in csv_rows] == ["teacher", "student_alone", "hinton_kd"]
    assert csv_rows[2]["acc_last_mean"] == rows["hinton_kd"]["acc_last_mean"]


def _result(run, seed, acc, best, method="OfflineDistillation", **extra):
    return {
        "run": run,
        "seed": seed,
        "method": method,
        "test_acc": acc,
        "test_acc_best_val": best,
        "params": 100,
        "seconds": 1.0,
        **extra,
    }


def test_summary_means_stds_deltas_and_published_columns():
    results = [
        _result("alone", 0, 0.90, 0.91, "Supervised", job_type="baseline"),
        _result("alone", 1, 0.92, 0.93, "Supervised", job_type="baseline"),
        _result("kd", 0, 0.95, 0.96, agreement=0.97, val_is_test=True),
        _result("kd", 1, 0.93, 0.96, agreement=0.95, val_is_test=True),
    ]
    rows = summarise(
        results,
        ["alone", "kd"],
        baselines={"alone": "alone", "kd": "alone"},
        published={"kd": {"test_acc": 94.5, "source": "paper"}},
    )
    alone, kd = rows
    assert alone["acc_last_mean"] == 91.0
    assert alone["acc_last_std"] == round(statistics.stdev([90.0, 92.0]), 2) == 1.41
    assert kd["acc_last_mean"] == 94.0 and kd["acc_best_val_mean"] == 96.0
    assert kd["acc_best_val_std"] == 0.0
    assert kd["delta_last"] == 3.0 and kd["delta_best_val"] == 4.0
    assert alone["delta_last"] is None and alone["baseline"] is None
    assert kd["agreement_mean"] == 96.0
    # val = test: the published (best-epoch) figure is compared with our best-val column.
    assert kd["ours_minus_published"] == 1.5 and alone["published_acc"] is None
    markdown = format_markdown(rows, "t")
    assert "test acc % last epoch" in markdown and "test acc % best-val epoch" in markdown
    assert "| 96.00 ± 0.00 † |" in markdown and "published %" in markdown
    assert "| +3.00 | +4.00 |" in markdown


def test_grid_set_and_dry_run(tmp_path, capsys):
    path = _study_file(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["runs"][2]["grid"] = {
        "T": {
            "key": "model.init_args.loss_terms.0.init_args.loss.init_args.temperature",
            "values": [2.0, 8.0],
        },
        "alpha": {"key": "model.init_args.loss_terms.0.init_args.weight", "values": [0.5, 0.9]},
    }
    path.write_text(yaml.safe_dump(spec))
    study = Study.from_file(path)
    names = [r.name for r in study.runs]
    assert names[2:] == [
        "hinton_kd[T=2.0,alpha=0.5]",
        "hinton_kd[T=2.0,alpha=0.9]",
        "hinton_kd[T=8.0,alpha=0.5]",
        "hinton_kd[T=8.0,alpha=0.9]",
    ]
    plan = plan_study(
        study, study.ordered_runs(), {"model.init_args.loss_terms.1.init_args.weight": 0.2}
    )
    by_name = {p.run.name: p for p in plan}
    kd = by_name["hinton_kd[T=8.0,alpha=0.5]"].config["model"]["init_args"]["loss_terms"]
    assert kd[0]["init_args"]["loss"]["init_args"]["temperature"] == 8.0
    assert kd[0]["init_args"]["weight"] == 0.5 and kd[1]["init_args"]["weight"] == 0.2
    # --set reaches only the runs that have the key's parent (not the teacher) ...
    assert by_name["teacher"].set_keys == [] and by_name["teacher"].run_dir.name == "seed0"
    assert by_name["teacher"].run_dir.parent.name == "teacher"
    assert by_name["hinton_kd[T=2.0,alpha=0.5]"].run_dir.parent.name.startswith("set-")
    # ... and a student's digest follows its teacher's: retraining the teacher retrains it.
    other = plan_study(study, study.ordered_runs(), {"trainer.max_epochs": 1})
    assert other[2].digest != plan[2].digest
    with pytest.raises(ValueError, match="no run's config has the parent"):
        plan_study(study, study.ordered_runs(), {"model.init_args.nothing_here.x": 1})
    run_study(path, dry_run=True)
    assert "[1/6] teacher seed=0: todo" in capsys.readouterr().out


def test_study_file_errors(tmp_path):
    with pytest.raises(ValueError, match="baseline 'nope'"):
        Study.from_file(_study_file(tmp_path, baseline="nope"))
    with pytest.raises(ValueError, match="unknown keys"):
        Study.from_file(_study_file(tmp_path, seed=[0]))
    with pytest.raises(ValueError, match="wandb"):
        Study.from_file(_study_file(tmp_path, wandb={"projekt": "x"}))


def test_wandb_offline_study_logs_config_losses_group_and_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = _study_file(tmp_path, wandb={"project": "kd-test", "mode": "offline", "log_model": True})
    overrides = {**TINY, "trainer.max_epochs": 1}
    results = run_study(path, overrides=overrides, only=["hinton_kd"], echo=False)
    runs = read_offline_runs(tmp_path / "out" / "wandb")
    by_job = {r.job_type: r for r in runs}
    assert sorted(by_job) == ["distill", "summary", "teacher"]
    assert len({r.group for r in runs}) == 1 and runs[0].group.startswith("tiny-")
    kd = by_job["distill"]
    assert kd.name == "hinton_kd-seed0"
    resolved = yaml.safe_load(
        next((tmp_path / "out" / "runs" / "hinton_kd").glob("set-*/seed0/config.yaml")).read_text()
    )
    for section in ("model", "data", "trainer", "seed_everything"):
        assert kd.config[section] == resolved[section], section
    for key in ("train/loss_kd_step", "train/loss_ce_step", "train/loss_epoch", "val/loss_kd",
                "val/loss_ce", "val/acc", "val/agreement"):  # fmt: skip
        assert key in kd.metric_keys, key
    assert {"name": "model-hinton_kd", "type": "model"} in kd.artifacts
    assert kd.summary["study/test_acc"] == pytest.approx(results[-1]["test_acc"])
    table = read_table(by_job["summary"], "study/results")
    assert [row["run"] for row in table] == ["teacher", "hinton_kd"]


def test_wandb_that_cannot_start_degrades_to_csv(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    path = _study_file(tmp_path, wandb=True)
    with pytest.warns(RuntimeWarning, match="W&B could not start .*CSV logs only"):
        results = run_study(path, overrides={**TINY, "trainer.max_epochs": 1}, echo=False)
    assert len(results) == 3 and results.paths["csv"].is_file()
    for result in results:
        metrics = Path(result["checkpoint"]).parent / "logs" / "metrics.csv"
        assert metrics.is_file()
    assert json.loads(Path(results[0]["checkpoint"]).with_name("result.json").read_text())


def test_only_a_student_still_fills_agreement_from_the_finished_teacher(tmp_path, capsys):
    path = _study_file(tmp_path)
    run_study(path, overrides=TINY, only=["teacher"], echo=False)
    results = run_study(path, overrides=TINY, only=["student_alone"], echo=True)
    alone = next(r for r in results if r["run"] == "student_alone")
    # The teacher was not selected, but it finished earlier: its agreement is measured.
    assert alone["agreement_with"] == "teacher" and 0 <= alone["agreement"] <= 1
    assert "agreement left empty" not in capsys.readouterr().out
