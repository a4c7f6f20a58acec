"""A run's own ``seeds``: a teacher trained once (``seeds: [0]``) serves every student seed.

The students' seeds vary the student only: each seed's config points at the one teacher's
checkpoint, the teacher trains once, its agreement is measured for every seed, and pinning a
teacher in an existing study leaves its finished seed-0 runs finished (same digests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.study import Study, StudyError, plan_study, run_study
from tests.bench.test_study import TINY, _study_file

KEY = "model.init_args.teacher.init_args.checkpoint_path"


def _pinned(tmp_path: Path, teacher_seeds: list[int], seeds: list[int]) -> Path:
    path = _study_file(tmp_path, seeds=seeds)
    spec = yaml.safe_load(path.read_text())
    spec["runs"][0]["seeds"] = teacher_seeds
    path.write_text(yaml.safe_dump(spec))
    return path


def _teacher_path(item) -> str:
    return item.config["model"]["init_args"]["teacher"]["init_args"]["checkpoint_path"]


def test_one_teacher_serves_every_student_seed(tmp_path):
    path = _pinned(tmp_path, [0], [0, 1])
    study = Study.from_file(path)
    plan = plan_study(study, study.ordered_runs())
    assert [(p.run.name, p.seed) for p in plan] == [
        ("teacher", 0), ("student_alone", 0), ("student_alone", 1), ("hinton_kd", 0),
        ("hinton_kd", 1),
    ]  # fmt: skip
    teacher_ckpt = str(tmp_path / "out" / "runs" / "teacher" / "seed0" / "final.ckpt")
    students = [p for p in plan if p.run.name == "hinton_kd"]
    assert [_teacher_path(p) for p in students] == [teacher_ckpt, teacher_ckpt]
    assert [p.dep_seeds for p in students] == [{"teacher": 0}, {"teacher": 0}]
    # The same finished seed-0 runs as the study without the pin: nothing is retrained.
    (tmp_path / "plain").mkdir()
    unpinned = Study.from_file(_study_file(tmp_path / "plain", seeds=[0, 1]))
    unpinned.output_dir = study.output_dir
    before = {(p.run.name, p.seed): p.digest for p in plan_study(unpinned, unpinned.ordered_runs())}
    assert all(before[(p.run.name, p.seed)] == p.digest for p in plan if p.seed == 0)


def test_the_pinned_teacher_trains_once_and_every_seed_gets_agreement(tmp_path, capsys):
    path = _pinned(tmp_path, [0], [0, 1])
    tiny = {**TINY, "trainer.max_epochs": 1}
    results = run_study(path, overrides=tiny, only=["hinton_kd"], echo=True)
    assert sorted((r["run"], r["seed"]) for r in results) == [
        ("hinton_kd", 0), ("hinton_kd", 1), ("teacher", 0)
    ]  # fmt: skip
    assert not list((tmp_path / "out" / "runs" / "teacher").glob("*/seed1"))
    for result in results:
        if result["run"] != "teacher":
            assert result["agreement_with"] == "teacher" and 0 <= result["agreement"] <= 1
    assert "agreement left empty" not in capsys.readouterr().out
    # --seeds 1 retrains nothing: the teacher keeps its own seed and is done.
    again = run_study(path, overrides=tiny, only=["hinton_kd"], seeds=[1], echo=True)
    assert "teacher seed=0: done before, skipped" in capsys.readouterr().out
    assert {(r["run"], r["seed"]) for r in again} >= {("teacher", 0), ("hinton_kd", 1)}


def test_a_seed_the_teacher_does_not_train_is_an_error_naming_the_fix(tmp_path):
    study = Study.from_file(_pinned(tmp_path, [0, 1], [0, 2]))
    with pytest.raises(StudyError, match=r"needs 'teacher', which trains seeds \[0, 1\]: give"):
        plan_study(study, study.ordered_runs())
    spec = yaml.safe_load(_pinned(tmp_path, [0], [0]).read_text())
    spec["runs"][0]["seeds"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match="`seeds` must be a list of integer seeds"):
        Study.from_file(tmp_path / "bad.yaml")


def test_an_empty_run_seeds_is_the_studys_and_bad_seeds_are_refused(tmp_path):
    path = _pinned(tmp_path, [0], [0, 1])
    spec = yaml.safe_load(path.read_text())
    spec["runs"][0]["seeds"] = None  # `seeds:` left blank
    path.write_text(yaml.safe_dump(spec))
    study = Study.from_file(path)
    assert [p.seed for p in plan_study(study, study.ordered_runs()) if p.run.name == "teacher"] == [
        0, 1
    ]  # fmt: skip
    for bad, match in [([-1], r"outside \[0, 4294967295\]"), ([2**40], "outside"),
                       ([0, 0], "repeats a seed")]:  # fmt: skip
        spec["runs"][0]["seeds"] = bad
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(StudyError, match=match):
            Study.from_file(path)
        with pytest.raises(StudyError, match=rf"--seeds.*{match}"):
            run_study(_pinned(tmp_path, [0], [0]), seeds=bad, dry_run=True)


def test_seeds_restrict_a_run_with_its_own_seeds_to_those_that_run_now(tmp_path):
    study = Study.from_file(_pinned(tmp_path, [0, 1], [0, 1]))
    study.seeds = [0]  # as --seeds 0 sets it
    plan = plan_study(study, study.ordered_runs())
    assert [(p.run.name, p.seed) for p in plan if p.run.name == "teacher"] == [("teacher", 0)]


def _pairs(study: Study) -> dict[str, list[tuple[int, int]]]:
    """Per run, its planned (seed, teacher seed) pairs."""
    pairs: dict[str, list[tuple[int, int]]] = {}
    for item in plan_study(study, study.ordered_runs()):
        pairs.setdefault(item.run.name, []).append((item.seed, item.dep_seeds.get("teacher", -1)))
    return pairs


def test_a_dependency_trains_every_seed_a_planned_run_needs_and_no_other(tmp_path):
    path = _study_file(tmp_path, seeds=[0, 1, 2])
    spec = yaml.safe_load(path.read_text())
    spec["runs"] = [spec["runs"][0], spec["runs"][2]]  # teacher, hinton_kd
    spec["baseline"], spec["reference_teacher"] = None, None
    # The student lists seeds the study does not run now: it trains them all, seed for seed.
    spec["runs"][1]["seeds"] = [0, 1]
    path.write_text(yaml.safe_dump(spec))
    study = Study.from_file(path)
    study.seeds = [2]  # --seeds 2
    assert _pairs(study) == {"teacher": [(0, -1), (1, -1), (2, -1)],
                             "hinton_kd": [(0, 0), (1, 1)]}  # fmt: skip
    # A teacher of several seeds, none of them run now: only the one the student needs.
    spec["runs"][0]["seeds"], spec["runs"][1]["seeds"] = [0, 1], [0]
    path.write_text(yaml.safe_dump(spec))
    for cli, teacher in (([1], [(0, -1), (1, -1)]), ([2], [(0, -1)])):
        study = Study.from_file(path)
        study.seeds = cli
        assert _pairs(study) == {"teacher": teacher, "hinton_kd": [(0, 0)]}, cli
