"""A study on more than one device is refused before anything trains, naming why and the fix.

A study builds, fits, evaluates and tabulates every run in the process that reads the study
file: ``ddp`` would start the study again in each process (it re-runs the command line) and
``ddp_spawn`` would pickle the study's callbacks into every process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.preflight import PreflightError
from kd_lightning.bench.study import main, run_study

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"


def _study(tmp_path: Path, trainer: dict) -> Path:
    config = yaml.safe_load((DIGITS / "student_alone.yaml").read_text())
    config["trainer"].update({"max_epochs": 1, "limit_train_batches": 1, **trainer})
    config["trainer"].pop("logger", None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    spec = {"name": "devices", "seeds": [0], "output_dir": str(tmp_path / "out"),
            "runs": [{"name": "alone", "config": str(tmp_path / "run.yaml")}]}  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_study_with_two_devices_is_refused_at_start_up(strategy, tmp_path):
    path = _study(tmp_path, {"accelerator": "cpu", "devices": 2, "strategy": strategy})
    with pytest.raises(PreflightError) as error:
        run_study(path, echo=False)
    message = str(error.value)
    assert "run 'alone'" in message and "would run 2 processes" in message
    assert "trainer.devices: 1" in message and "kd-lightning fit -c" in message
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained, nothing written


def test_the_command_prints_the_refusal_and_exits_with_the_usage_status(tmp_path, capsys):
    path = _study(tmp_path, {"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    with pytest.raises(SystemExit) as stop:
        main([str(path)])
    assert stop.value.code == 2
    assert "would run 2 processes" in capsys.readouterr().err


def test_one_device_trains(tmp_path):
    results = run_study(_study(tmp_path, {"accelerator": "cpu", "devices": 1}), echo=False)
    assert results[0]["epochs"] == 1
