"""A malformed study file fails as it is read, with a message that names the fix; through
`kd-lightning study` that message is printed alone (no traceback) with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.study import main
from kd_lightning.bench.study_file import Study, StudyError

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"
TEACHER = str(DIGITS / "teacher.yaml")


def _spec(**fields):
    return {"name": "s", "seeds": [0], "runs": [{"name": "teacher", "config": TEACHER}], **fields}


def _run(**fields):
    return _spec(runs=[{"name": "teacher", "config": TEACHER, **fields}])


# (spec, a phrase of the problem, a phrase of the fix), each written by hand from the rule.
MALFORMED = [
    (_spec(seeds=3), "the number 3", "seeds: [0, 1, 2]"),
    (_spec(seeds=1), "the number 1", "seeds: [0]"),
    (_spec(seeds="0, 1"), "non-empty list of integers", "seeds: [0, 1, 2]"),
    (_spec(seeds=[0, 0.5]), "non-empty list of integers", "seeds: [0, 1, 2]"),
    (_spec(seeds=[]), "non-empty list of integers", "seeds: [0, 1, 2]"),
    (_spec(seeds=[1, 1]), "repeats a seed", "List each seed once"),
    (_spec(name=5), "`name` must be a non-empty string", 'name: "5"'),
    (_spec(runs={"name": "teacher"}), "lists no runs", "non-empty list"),
    (_spec(runs=["teacher.yaml"]), "every item of `runs` must be a mapping", "name: teacher"),
    (_spec(checkpoint_every_n_epochs=-1), "integer >= 0", "Use 1 (every epoch)"),
    (_spec(latency="yes"), "`latency` must be true or false", "latency: false"),
    (_spec(baseline=["a"]), "`baseline` must be a run name or null", "Quote it"),
    (_run(overrides=["trainer.max_epochs=2"]), "`overrides` must be a mapping", "e.g. overrides:"),
    (_run(needs={"model.x": 3}), "`needs` maps 'model.x' to 3", "Map each config key to a run"),
    (_run(config=7), "`config` must be a file path or a mapping", "config: teacher.yaml"),
    (_run(grid=[1, 2]), "`grid` must be a mapping of axes", "grid: {T:"),
]


@pytest.mark.parametrize(("spec", "problem", "fix"), MALFORMED, ids=lambda v: str(v)[:40])
def test_malformed_field_names_problem_and_fix(tmp_path, spec, problem, fix):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError) as error:
        Study.from_file(path)
    assert problem in str(error.value)
    assert fix in str(error.value)
    assert str(path) in str(error.value)  # which file


def test_cli_prints_the_message_alone_and_exits_2(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_spec(seeds=3)))
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-lightning study: error: ")
    assert "seeds: [0, 1, 2]" in err and "Traceback" not in err
    with pytest.raises(StudyError, match="the number 3"):  # the traceback behind a flag
        main([str(path), "--traceback"])


def test_missing_files_are_study_errors_and_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Study.from_file(tmp_path / "nope.yaml")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_run(config="missing.yaml")))
    with pytest.raises(StudyError, match="missing.yaml"):
        Study.from_file(path)


def test_a_well_formed_file_keeps_its_values(tmp_path):
    path = tmp_path / "study.yaml"
    spec = _spec(seeds=[3, 1], checkpoint_every_n_epochs=0, latency=False, description="d")
    path.write_text(yaml.safe_dump(spec))
    study = Study.from_file(path)
    assert study.seeds == [3, 1] and study.checkpoint_every_n_epochs == 0
    assert study.latency is False and study.runs[0].config == Path(TEACHER)
