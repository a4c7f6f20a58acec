"""Kind 8: naming a file never runs code from it. A checkpoint whose unpickling would create a
file is refused through every loader a user names files to (Python, CLI, export, teacher cache,
synthesised sets, int8 files, study teacher paths); the file is never created, and the message
names the risk and the opt-in for trusted files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.artifact import load_student
from kd_lightning.bench.preflight import PreflightError
from kd_lightning.bench.study import run_study
from kd_lightning.callbacks import load_compressed_student, load_quantized
from kd_lightning.data import DigitsTransferSet, TeacherCache
from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.export_command import ExportCommandError, export_checkpoint
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP, FromCheckpoint
from kd_lightning.models.spec import model_spec
from kd_lightning.synthesis import SynthesisedSet
from kd_lightning.teachers import PretrainedTeacher
from kd_lightning.teachers.pretrained import load_weights_file
from tests.safety.conftest import DIGITS, run_cli

RISK = "would run code"


class CreatesAFile:
    """Unpickling this object calls ``open(path, "w")``: the file appears if code runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def booby_trapped(tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a kd_lightning-shaped checkpoint with the trap inside."""
    marker = tmp_path / "created-by-unpickling"
    student = MLP(hidden_sizes=[8])
    checkpoint = tmp_path / "downloaded.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
            "kd_lightning": {"student_spec": model_spec(student), "student_prefix": "student."},
            "hyper_parameters": {"trap": CreatesAFile(marker)},
        },
        checkpoint,
    )
    assert not marker.exists()
    return checkpoint, marker


LOADERS = {
    "PretrainedTeacher": lambda p: PretrainedTeacher(str(p)),
    "PretrainedTeacher(model=)": lambda p: PretrainedTeacher(str(p), model=MLP(hidden_sizes=[8])),
    "load_weights_file": lambda p: load_weights_file(p, MLP(hidden_sizes=[8])),
    "load_student": load_student,
    "FromCheckpoint": lambda p: FromCheckpoint(str(p)),
    "Supervised.load_from_checkpoint": Supervised.load_from_checkpoint,
    "OfflineDistillation.load_from_checkpoint": OfflineDistillation.load_from_checkpoint,
    "load_quantized": load_quantized,
    "load_compressed_student": load_compressed_student,
    "SynthesisedSet.load": SynthesisedSet.load,
    "SynthesisedTransferSet": lambda p: SynthesisedTransferSet(
        DigitsTransferSet(), path=str(p)
    ).setup("fit"),
    "TeacherCache(teacher_checkpoint=)": lambda p: TeacherCache(
        str(p.parent / "cache.kdtc"), teacher_checkpoint=str(p), progress=False, splits=("val",)
    ).ensure(DigitsTransferSet()),
}


@pytest.mark.parametrize("load", list(LOADERS.values()), ids=list(LOADERS))
def test_python_loaders_refuse_the_file_and_run_nothing(booby_trapped, load):
    checkpoint, marker = booby_trapped
    with pytest.raises(ValueError) as error:
        load(checkpoint)
    assert not marker.exists()
    assert RISK in str(error.value)


def test_export_refuses_the_file_and_runs_nothing(booby_trapped, tmp_path):
    checkpoint, marker = booby_trapped
    with pytest.raises(ExportCommandError, match=RISK) as error:
        export_checkpoint(checkpoint, output=tmp_path / "student.onnx")
    assert not marker.exists() and "weights_only=False" in str(error.value)
    assert not (tmp_path / "student.onnx").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "-c", str(DIGITS / "student_alone.yaml"), "--ckpt_path={ckpt}"],
        ["test", "-c", str(DIGITS / "student_alone.yaml"), "--ckpt_path={ckpt}"],
        ["predict", "-c", str(DIGITS / "student_alone.yaml"), "--ckpt_path={ckpt}"],
        [
            "fit",
            "-c",
            str(DIGITS / "hinton_kd.yaml"),
            "--model.init_args.teacher.init_args.checkpoint_path={ckpt}",
        ],
        ["export", "--checkpoint={ckpt}"],
    ],
    ids=["fit resume", "test", "predict", "teacher of a config", "export"],
)
def test_the_cli_refuses_the_file_and_runs_nothing(
    booby_trapped, tmp_path, monkeypatch, capsys, command
):
    checkpoint, marker = booby_trapped
    monkeypatch.chdir(tmp_path)
    code, err = run_cli([part.format(ckpt=checkpoint) for part in command], capsys)
    assert code == 2 and not marker.exists()
    first = err.strip().splitlines()[0]
    assert RISK in first and "weights_only=False" in first
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("last.ckpt"))


def test_a_study_whose_teacher_path_is_the_file_refuses_it_before_anything_trains(
    booby_trapped, tmp_path
):
    checkpoint, marker = booby_trapped
    run = {
        "name": "kd",
        "config": str(DIGITS / "hinton_kd.yaml"),
        "overrides": {
            "model.init_args.teacher.init_args.checkpoint_path": str(checkpoint),
            "trainer.max_epochs": 1,
        },
    }
    spec = {"name": "trap", "seeds": [0], "output_dir": str(tmp_path / "out"), "runs": [run]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PreflightError, match=RISK):
        run_study(path, echo=False)
    assert not marker.exists()
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_the_file_is_read_as_plain_data_only_when_trusted_explicitly(booby_trapped):
    checkpoint, marker = booby_trapped
    # What the message offers, for a file whose origin the user trusts: it does run the code.
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()
