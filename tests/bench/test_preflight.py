"""Every run of a study is built and checked on one example batch before the first run trains:
a bad 4th run fails before runs 1-3 train, naming the run and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.plan import plan_study
from kd_lightning.bench.preflight import PreflightError, preflight
from kd_lightning.bench.study import run_study
from kd_lightning.bench.study_file import Study

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"
TEACHER_KEY = "model.init_args.teacher.init_args.checkpoint_path"
KD_TEMPERATURE = "model.init_args.loss_terms.0.init_args.loss.init_args.temperature"
TINY = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1}


def _study(tmp_path: Path, bad_runs: list[dict]) -> Path:
    good = [
        {"name": "teacher", "config": str(DIGITS / "teacher.yaml")},
        {"name": "student_alone", "config": str(DIGITS / "student_alone.yaml")},
        {
            "name": "hinton_kd",
            "config": str(DIGITS / "hinton_kd.yaml"),
            "needs": {TEACHER_KEY: "teacher"},
        },
    ]
    spec = {"name": "pre", "seeds": [0, 1], "output_dir": str(tmp_path / "out")}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**spec, "runs": good + bad_runs}))
    return path


BAD_RUNS = {
    "temperature 0": (
        {
            "name": "kd_T0",
            "config": str(DIGITS / "hinton_kd.yaml"),
            "overrides": {KD_TEMPERATURE: 0.0},
            "needs": {TEACHER_KEY: "teacher"},
        },
        "temperature must be > 0",
    ),
    "layer-name typo": (
        {
            "name": "fitnets_typo",
            "config": str(DIGITS / "fitnets.yaml"),
            "overrides": {"model.init_args.loss_terms.1.init_args.student": "stage9"},
            "needs": {TEACHER_KEY: "teacher"},
        },
        "stage9",
    ),
    # Only visible with the teacher built: checked against a stand-in of the untrained teacher.
    "teacher of another architecture": (
        {
            "name": "born_again_mlp",
            "config": str(DIGITS / "born_again.yaml"),
            "overrides": {
                "model.init_args.student": {
                    "class_path": "kd_lightning.models.MLP",
                    "init_args": {"hidden_sizes": [32]},
                }
            },
            "needs": {TEACHER_KEY: "teacher"},
        },
        "BornAgain needs a teacher of the student's own architecture",
    ),
    "unknown method argument": (
        {
            "name": "kd_typo_arg",
            "config": str(DIGITS / "hinton_kd.yaml"),
            "overrides": {"model.init_args.temprature": 4.0},
            "needs": {TEACHER_KEY: "teacher"},
        },
        "temprature",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_RUNS))
def test_a_bad_fourth_run_fails_before_anything_trains(tmp_path, kind):
    bad, phrase = BAD_RUNS[kind]
    path = _study(tmp_path, [bad])
    with pytest.raises(PreflightError) as error:
        run_study(path, overrides=TINY, echo=False)
    message = str(error.value)
    assert f"run {bad['name']!r}" in message and phrase in message
    assert "nothing has trained yet" in message
    assert list(error.value.failures) == [bad["name"]]  # the three good runs passed
    assert not (tmp_path / "out").exists()  # no run folder, no checkpoint, no step


def test_every_bad_run_is_reported_at_once(tmp_path):
    bads = [BAD_RUNS[k][0] for k in ("temperature 0", "teacher of another architecture")]
    study = Study.from_file(_study(tmp_path, bads))
    plan = plan_study(study, study.ordered_runs(), TINY)
    with pytest.raises(PreflightError) as error:
        preflight(plan, study.needed)
    assert sorted(error.value.failures) == ["born_again_mlp", "kd_T0"]


def test_a_run_whose_teacher_cannot_start_is_named_not_checked(tmp_path):
    bad_teacher = {
        "name": "teacher",
        "config": str(DIGITS / "teacher.yaml"),
        "overrides": {"model.init_args.optimizer.init_args.lr": "fast"},
    }
    spec = yaml.safe_load(_study(tmp_path, []).read_text())
    spec["runs"][0] = bad_teacher
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PreflightError) as error:
        run_study(path, overrides=TINY, echo=False)
    failures = error.value.failures
    assert "fast" in failures["teacher"]
    assert failures["hinton_kd"] == "not checked: it needs ['teacher'], which cannot start"
    assert "student_alone" not in failures


def test_preflight_checks_each_run_once_and_skips_finished_runs(tmp_path):
    study = Study.from_file(_study(tmp_path, []))
    plan = plan_study(study, study.ordered_runs(), TINY)
    assert len(plan) == 6  # 3 runs x 2 seeds
    assert preflight(plan, study.needed) == ["teacher", "student_alone", "hinton_kd"]
    for item in plan:
        item.status = "done"
    assert preflight(plan, study.needed) == []


def test_a_teacher_cache_is_never_built_from_a_stand_in_where_real_runs_read(tmp_path):
    cache = tmp_path / "shared" / "teacher.kdtc"
    cached = {
        "model.init_args.teacher": None,
        "data.init_args.teacher_cache": {
            "class_path": "kd_lightning.data.TeacherCache",
            "init_args": {"path": str(cache), "teacher_checkpoint": None, "progress": False},
        },
    }
    needs = {"data.init_args.teacher_cache.init_args.teacher_checkpoint": "teacher"}
    runs = [
        {"name": f"kd_cached_{t}", "config": str(DIGITS / "hinton_kd.yaml"), "needs": needs,
         "overrides": {**cached, KD_TEMPERATURE: t}}
        for t in (2.0, 4.0)
    ]  # fmt: skip
    study = Study.from_file(_study(tmp_path, runs))
    plan = plan_study(study, study.ordered_runs(), TINY)
    checked = preflight(plan, study.needed)
    assert checked[-2:] == ["kd_cached_2.0", "kd_cached_4.0"]  # the cached batches were checked
    assert not cache.exists() and not cache.parent.exists()
