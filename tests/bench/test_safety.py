"""A finished study's results are never replaced silently: a changed config is refused (naming
--overwrite) with every file byte-identical; a quick check writes its own, marked table; writes
are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.files import atomic_path, atomic_write_text
from kd_lightning.bench.report import read_csv
from kd_lightning.bench.study import StudyOverwriteError, main, run_study

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"
TINY = {
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.log_every_n_steps": 1,
}
LR = "model.init_args.optimizer.init_args.lr"


def _write_study(tmp_path: Path, config: Path, lr: float) -> Path:
    spec = {
        "name": "safe",
        "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "latency": False,
        "runs": [{"name": "alone", "config": str(config), "overrides": {**TINY, LR: lr}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_finished_results_are_refused_quick_checks_kept_apart_overwrite_replaces(tmp_path, capsys):
    config = tmp_path / "alone.yaml"
    config.write_text((DIGITS / "student_alone.yaml").read_text())
    path = _write_study(tmp_path, config, lr=0.003)
    out = tmp_path / "out"
    full = run_study(path, echo=False)
    assert full.quick_check is None and full.paths["markdown"] == out / "results.md"
    finished = _snapshot(out)
    assert "runs/alone/seed0/result.json" in finished and "results.png" in finished

    # A quick check trains beside the study and writes its own, marked table.
    quick = run_study(path, overrides={"trainer.max_epochs": 1}, echo=False)
    assert quick.quick_check == "--set trainer.max_epochs=1"
    folder = quick.paths["markdown"].parent
    assert folder.parent == out / "quick-checks"
    assert "QUICK CHECK, not the study's result" in quick.paths["markdown"].read_text()
    assert [r["quick_check"] for r in read_csv(quick.paths["csv"])] == [quick.quick_check]
    after_quick = _snapshot(out)
    for name, content in finished.items():
        assert after_quick[name] == content, name  # the study's own files untouched

    # A changed config (an override in the study file, then the config file itself) is refused
    # before anything is built; every file stays byte-identical.
    _write_study(tmp_path, config, lr=0.01)
    with pytest.raises(StudyOverwriteError, match="--overwrite") as error:
        run_study(path, echo=False)
    assert "alone seed=0" in str(error.value)
    assert _snapshot(out) == after_quick
    _write_study(tmp_path, config, lr=0.003)
    config.write_text(config.read_text().replace("hidden_sizes: [32]", "hidden_sizes: [16]"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == after_quick

    # Asked explicitly, the new config replaces the old result.
    replaced = run_study(path, echo=False, overwrite=True)
    new_result = (out / "runs/alone/seed0/result.json").read_bytes()
    assert new_result != finished["runs/alone/seed0/result.json"]
    assert replaced[0]["params"] != full[0]["params"]  # 64-16-10 instead of 64-32-10
    assert replaced[0]["params"] == 64 * 16 + 16 + 16 * 10 + 10


def test_only_and_seed_subsets_add_to_the_study_table_other_seeds_are_quick_checks(tmp_path):
    config = DIGITS / "student_alone.yaml"
    path = _write_study(tmp_path, config, lr=0.003)
    spec = yaml.safe_load(path.read_text())
    spec["seeds"] = [0, 1]
    spec["runs"].append(
        {
            "name": "alone_wide",
            "config": str(config),
            "overrides": {**TINY, LR: 0.003, "model.init_args.model.init_args.hidden_sizes": [48]},
        }
    )
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    first = run_study(path, seeds=[1], only=["alone"], echo=False)  # a piece of the study
    assert first.quick_check is None and first.paths["csv"] == out / "results.csv"
    assert [(r["run"], r["seeds"]) for r in first.rows] == [("alone", 1)]
    markdown = first.paths["markdown"].read_text()
    assert "Incomplete: 3 (run, seed) pair(s)" in markdown
    assert "alone seed=0, alone_wide seed=0, alone_wide seed=1" in markdown
    second = run_study(path, seeds=[0], echo=False)  # the rest of seed 0: the table grows
    assert [(r["run"], r["seeds"]) for r in second.rows] == [("alone", 2), ("alone_wide", 1)]
    table = (out / "results.csv").read_bytes()
    other = run_study(path, seeds=[7], only=["alone"], echo=False)  # not a seed of the study
    assert other.quick_check == "--seeds 7"
    assert other.paths["csv"].parent.parent == out / "quick-checks"
    assert (out / "results.csv").read_bytes() == table


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half a ta")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".csv" and temporary.parent == tmp_path
        temporary.write_text("new")
    assert target.read_text() == "new"
    atomic_write_text(tmp_path / "sub" / "result.json", "{}")
    assert (tmp_path / "sub" / "result.json").read_text() == "{}"
