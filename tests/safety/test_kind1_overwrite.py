"""Kind 1: a finished artifact is never replaced silently.

A rerun whose ModelCheckpoint has a fixed name is refused before any step (naming
``--overwrite``) and the earlier checkpoint stays byte-identical; ``--overwrite`` replaces it on
purpose, but a run that goes non-finite still leaves it alone; export never writes over its input.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.callbacks.finished_checkpoints import AtomicCheckpointIO, KeepFinishedCheckpoints
from kd_lightning.data import DigitsTransferSet
from kd_lightning.export_command import ExportCommandError, export_checkpoint
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli, trainer, unchanged, weights

TEACHER_CKPT = Path("runs/digits/teacher/teacher.ckpt")  # where teacher.yaml writes


@pytest.fixture
def finished_teacher(tmp_path, monkeypatch, supervised_checkpoint) -> bytes:
    """A finished ``runs/digits/teacher/teacher.ckpt`` in the working directory."""
    monkeypatch.chdir(tmp_path)
    TEACHER_CKPT.parent.mkdir(parents=True)
    shutil.copy(supervised_checkpoint, TEACHER_CKPT)
    return TEACHER_CKPT.read_bytes()


def _teacher_fit(*extra: str) -> list[str]:
    return ["fit", "-c", str(DIGITS / "teacher.yaml"), *TINY, MLP_MODEL, *extra]


def test_rerunning_the_teacher_config_is_refused_before_any_step(finished_teacher, capsys):
    code, err = run_cli(_teacher_fit(), capsys)
    assert code == 2
    first = err.strip().splitlines()[0]
    assert first.startswith("kd-lightning: error: ") and "teacher.ckpt" in first
    assert "--overwrite" in first and "--ckpt_path" in first and "Nothing was trained" in first
    assert TEACHER_CKPT.read_bytes() == finished_teacher
    assert sorted(p.name for p in TEACHER_CKPT.parent.glob("*.ckpt")) == ["teacher.ckpt"]


def test_overwrite_replaces_on_purpose_but_a_non_finite_run_leaves_the_file(
    finished_teacher, capsys, monkeypatch
):
    written = []
    atomic_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        written.append(path)
        atomic_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    # A learning rate of 1e30 makes the loss non-finite after the first update.
    code, err = run_cli(
        _teacher_fit("--overwrite", "--model.init_args.optimizer.init_args.lr=1e30"), capsys
    )
    assert code == 2
    assert "non-finite" in err.splitlines()[0] and "learning rate" in err.splitlines()[0]
    assert TEACHER_CKPT.read_bytes() == finished_teacher

    code, err = run_cli(_teacher_fit("--overwrite"), capsys)
    assert code == 0, err
    replaced = torch.load(TEACHER_CKPT, weights_only=True)
    assert replaced["kd_lightning"]["student_spec"]["init_args"]["hidden_sizes"] == [8]
    assert TEACHER_CKPT.read_bytes() != finished_teacher
    assert TEACHER_CKPT.resolve() in [Path(p).resolve() for p in written]  # written atomically


@pytest.mark.parametrize(
    ("checkpoint", "existing"),
    [
        (dict(filename="final"), "final.ckpt"),
        (dict(filename="{epoch}"), "epoch=0.ckpt"),  # a template writes the same names again
        (dict(filename="best-{epoch}", save_last=True), "last.ckpt"),
    ],
)
def test_fixed_names_in_python_are_refused_with_the_earlier_file_untouched(
    tmp_path, checkpoint, existing
):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / existing).write_bytes(b"an earlier run's checkpoint")
    callback = ModelCheckpoint(dirpath=folder, enable_version_counter=False, **checkpoint)
    model = Supervised(MLP(hidden_sizes=[8]))
    before = weights(model)
    fit = trainer(
        tmp_path, enable_checkpointing=True, callbacks=[callback, KeepFinishedCheckpoints()]
    )
    with pytest.raises(FileExistsError, match="--overwrite") as error:
        fit.fit(model, DigitsTransferSet(batch_size=32))
    assert existing in str(error.value)
    assert fit.global_step == 0 and unchanged(before, model)
    assert (folder / existing).read_bytes() == b"an earlier run's checkpoint"
    assert [p.name for p in folder.iterdir()] == [existing]


def test_a_versioned_checkpoint_never_replaces_so_it_is_not_refused(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "final.ckpt").write_bytes(b"earlier")
    callback = ModelCheckpoint(dirpath=folder, filename="final")  # version counter on
    fit = trainer(
        tmp_path, enable_checkpointing=True, callbacks=[callback, KeepFinishedCheckpoints()]
    )
    fit.fit(Supervised(MLP(hidden_sizes=[8])), DigitsTransferSet(batch_size=32))
    assert (folder / "final.ckpt").read_bytes() == b"earlier"
    assert (folder / "final-v1.ckpt").is_file()


@pytest.mark.parametrize("alias", ["same", "dotted", "symlink", "hardlink"])
def test_export_never_writes_over_its_checkpoint(tmp_path, supervised_checkpoint, alias):
    checkpoint = tmp_path / "t.ckpt"
    shutil.copy(supervised_checkpoint, checkpoint)
    before = checkpoint.read_bytes()
    output = {
        "same": checkpoint,
        "dotted": tmp_path / "sub" / ".." / "t.ckpt",
        "symlink": tmp_path / "link.onnx",
        "hardlink": tmp_path / "hard.onnx",
    }[alias]
    if alias == "symlink":
        output.symlink_to(checkpoint)
    if alias == "hardlink":
        os.link(checkpoint, output)
    with pytest.raises(ExportCommandError, match="is the checkpoint file"):
        export_checkpoint(checkpoint, output=output, overwrite=True)
    assert checkpoint.read_bytes() == before


class FailsWhenPickled:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_an_interrupted_checkpoint_write_leaves_the_earlier_file_whole(tmp_path):
    target = tmp_path / "teacher.ckpt"
    target.write_bytes(b"finished")
    io = AtomicCheckpointIO()
    payload = {"state_dict": {"w": torch.zeros(10_000)}, "late": FailsWhenPickled()}
    with pytest.raises(RuntimeError, match="simulated"):
        io.save_checkpoint(payload, target)
    assert target.read_bytes() == b"finished"
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.ckpt"]  # no partial file left
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
