"""Kind 1, input = output: ``predict`` never writes predictions over a file it reads (the
evaluated checkpoint, a teacher's checkpoint), however the path is spelled and even with
``--predictions.overwrite true``; ``export --output <a directory>`` is refused with a message,
not a raw zipfile error. The files are byte-identical afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kd_lightning.callbacks import PredictionWriter
from kd_lightning.data import DigitsTransferSet
from kd_lightning.export_command import ExportCommandError, export_checkpoint
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher
from tests.safety.conftest import DIGITS, MLP_MODEL, run_cli, trainer


@pytest.fixture
def checkpoint(supervised_checkpoint, tmp_path) -> Path:
    path = tmp_path / "model.pt"  # a .pt: a suffix the writer accepts, as the tester's was
    shutil.copy(supervised_checkpoint, path)
    return path


def spellings(path: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "sub").mkdir(exist_ok=True)
    link = tmp_path / "link.pt"
    if not link.exists():
        os.symlink(path, link)
    return [str(path), path.name, str(tmp_path / "sub" / ".." / path.name), str(link)]


def test_predict_never_writes_over_the_checkpoint_it_evaluates(checkpoint, tmp_path, monkeypatch):
    before = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    for spelling in spellings(checkpoint, tmp_path):
        writer = PredictionWriter(path=spelling, overwrite=True)
        run = trainer(tmp_path, callbacks=[writer])
        with pytest.raises(ValueError, match="--ckpt_path") as error:
            run.predict(
                Supervised(MLP(hidden_sizes=[8])), DigitsTransferSet(), ckpt_path=checkpoint
            )
        assert "never allows that" in str(error.value) and "--predictions.path" in str(error.value)
        assert checkpoint.read_bytes() == before, spelling
    assert not list(tmp_path.glob(".*partial*"))


def test_predict_never_writes_over_a_teacher_checkpoint(checkpoint, tmp_path, monkeypatch):
    before = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    for spelling in spellings(checkpoint, tmp_path):
        method = OfflineDistillation(MLP(hidden_sizes=[8]), PretrainedTeacher(str(checkpoint)))
        run = trainer(tmp_path, callbacks=[PredictionWriter(path=spelling, overwrite=True)])
        with pytest.raises(ValueError, match="the checkpoint of teacher"):
            run.predict(method, DigitsTransferSet())
        assert checkpoint.read_bytes() == before, spelling


def test_the_cli_refuses_predictions_over_its_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    before = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    for spelling in spellings(checkpoint, tmp_path)[:2]:
        code, err = run_cli(
            ["predict", "-c", str(DIGITS / "student_alone.yaml"), MLP_MODEL,
             f"--ckpt_path={checkpoint}", f"--predictions.path={spelling}",
             "--predictions.overwrite=true", "--trainer.logger=false"],
            capsys,
        )  # fmt: skip
        assert code != 0 and "which this run reads" in err, err[-2000:]
        assert checkpoint.read_bytes() == before


def test_export_refuses_a_directory_as_output_with_or_without_overwrite(checkpoint, tmp_path):
    folder = tmp_path / "exports"
    (folder / "version_0").mkdir(parents=True)
    (folder / "version_0" / "keep.txt").write_text("x")
    for directory in (folder, folder / "version_0", tmp_path / "dir.onnx"):
        directory.mkdir(exist_ok=True)
        for overwrite in (True, False):
            for fmt in ("onnx", "program"):
                with pytest.raises(ExportCommandError, match="is a directory, not a file"):
                    export_checkpoint(
                        checkpoint, format=fmt, output=directory, overwrite=overwrite,
                        example_shape=[1, 64],
                    )  # fmt: skip
    assert (folder / "version_0" / "keep.txt").read_text() == "x"


def test_the_cli_export_into_a_directory_ends_in_a_message(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, err = run_cli(
        ["export", f"--checkpoint={checkpoint}", f"--output={tmp_path / 'out'}", "--overwrite"],
        capsys,
    )
    assert code == 2 and "is a directory, not a file" in err and "BadZipFile" not in err
