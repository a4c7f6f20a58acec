"""A fit refused before its first optimizer step writes nothing that stays: no ``version_<N>/``
with a lone ``config.yaml``, no empty log folder (``RemoveRefusedRun``). Reruns do not pile up
versions, and an earlier run's folder stays byte-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli

ALONE = ["fit", "-c", str(DIGITS / "student_alone.yaml"), *TINY, MLP_MODEL]
RUNS = Path("runs/digits/student_alone")  # the config's CSVLogger folder
REFUSALS = {
    "optimizer": (ALONE + ["--model.init_args.optimizer.init_args.lr=-1"], "Invalid learning rate"),
    "empty training set": (
        ALONE + ["--data.init_args.omit_classes=[0,1,2,3,4,5,6,7,8,9]"],
        "omit",
    ),
    "scheduler": (
        ALONE
        + [
            "--model.init_args.lr_scheduler={class_path: torch.optim.lr_scheduler.OneCycleLR, "
            "init_args: {max_lr: 0.1}}"
        ],
        "total_steps",
    ),
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_refused_fit_leaves_no_folder_and_an_earlier_run_untouched(
    tmp_path, monkeypatch, capsys, refusal
):
    monkeypatch.chdir(tmp_path)
    command, sentence = REFUSALS[refusal]
    code, err = run_cli(command, capsys)  # a first refusal: nothing existed before
    assert code == 2 and sentence in err.splitlines()[0]
    assert not Path("runs").exists()
    earlier = RUNS / "version_0"  # an earlier finished run
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.yaml").write_text("earlier: run\n")
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"earlier weights")
    before = _files(tmp_path)
    for _ in range(2):  # reruns do not pile up versions
        code, err = run_cli(command, capsys)
        assert code == 2 and sentence in err.splitlines()[0]
    assert _files(tmp_path) == before
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0"]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_refused_rerun_of_a_finished_teacher_leaves_no_folder(
    tmp_path, monkeypatch, capsys, supervised_checkpoint
):
    monkeypatch.chdir(tmp_path)
    teacher = Path("runs/digits/teacher/teacher.ckpt")
    teacher.parent.mkdir(parents=True)
    shutil.copy(supervised_checkpoint, teacher)
    before = _files(tmp_path)
    code, err = run_cli(["fit", "-c", str(DIGITS / "teacher.yaml"), *TINY, MLP_MODEL], capsys)
    assert code == 2 and "--overwrite" in err.splitlines()[0]
    assert _files(tmp_path) == before
    assert [p for p in tmp_path.rglob("*") if p.is_dir() and not any(p.iterdir())] == []


def test_the_corrected_run_takes_the_first_version(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command, _ = REFUSALS["optimizer"]
    assert run_cli(command, capsys)[0] == 2
    code, err = run_cli(ALONE, capsys)
    assert code == 0, err
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0"]
    assert (RUNS / "version_0" / "config.yaml").is_file()
    assert (RUNS / "version_0" / "checkpoints" / "last.ckpt").is_file()
