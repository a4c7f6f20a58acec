"""A teacher file that needs the full unpickler loads only with an explicit opt-in named for its
risk (``trust_pickled_code=True``, from Python, YAML or the command line). Without it the file is
refused, nothing in it runs (a file its unpickling would create does not exist), and the refusal
names the opt-in; with it the teacher loads with the file's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.models import MLP
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import PretrainedTeacher
from kd_lightning.teachers.pretrained import PermutedTeacher
from tests.safety.conftest import DIGITS, TINY, run_cli

OPT_IN = "trust_pickled_code=True"


class CreatesAFile:
    """Unpickling this object calls ``open(path, "w")``: the file appears if code runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_and_return(path: str, value: torch.Tensor) -> torch.Tensor:
    Path(path).write_text("ran")
    return value


class TrappedTensor:
    """Unpickles to ``value`` after creating the file (a weight that runs code on load)."""

    def __init__(self, path: Path, value: torch.Tensor) -> None:
        self.path, self.value = str(path), value

    def __reduce__(self):
        return (_write_and_return, (self.path, self.value))


def _artifact(student, trap):  # a kd_lightning checkpoint
    return {
        "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
        "kd_lightning": {"student_spec": model_spec(student), "student_prefix": "student."},
        "hyper_parameters": {"trap": trap},
    }


def _foreign(student, trap):  # another LightningModule's checkpoint, network under "net."
    return {"state_dict": {f"net.{k}": v for k, v in student.state_dict().items()}, "x": trap}


def _plain(student, trap):  # a state_dict whose first weight runs code when unpickled
    state = dict(student.state_dict())
    first = next(iter(state))
    state[first] = TrappedTensor(Path(trap.path), state[first])
    return state


KINDS = {
    "kd_lightning artifact": (_artifact, {}),
    "foreign Lightning checkpoint": (_foreign, {"model": "mlp"}),
    "plain state_dict": (_plain, {"model": "mlp"}),
}


def _teacher(path: Path, kind: dict, **kwargs) -> PretrainedTeacher:
    options = {k: (MLP(hidden_sizes=[8]) if v == "mlp" else v) for k, v in kind.items()}
    return PretrainedTeacher(str(path), **options, **kwargs)


@pytest.fixture(params=list(KINDS))
def trapped(request, tmp_path) -> tuple[Path, Path, MLP, dict]:
    make, options = KINDS[request.param]
    marker = tmp_path / "created-by-unpickling"
    torch.manual_seed(1)
    student = MLP(hidden_sizes=[8]).eval()
    path = tmp_path / "downloaded.ckpt"
    torch.save(make(student, CreatesAFile(marker)), path)
    return path, marker, student, options


def test_without_the_opt_in_the_file_is_refused_and_runs_nothing(trapped):
    path, marker, _, options = trapped
    with pytest.raises(ValueError) as error:
        _teacher(path, options)
    assert not marker.exists()
    message = str(error.value)
    assert "would run code" in message and OPT_IN in message
    assert "--model.init_args.teacher.init_args.trust_pickled_code=true" in message


def test_with_the_opt_in_the_teacher_loads_the_files_weights(trapped):
    path, marker, student, options = trapped
    teacher = _teacher(path, options, trust_pickled_code=True)
    assert marker.exists()  # what the name says: the file's code ran
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), student(x))


def test_a_permuted_teacher_passes_the_opt_in_on(tmp_path):
    path, marker = tmp_path / "t.ckpt", tmp_path / "marker"
    torch.save(_artifact(MLP(hidden_sizes=[8]), CreatesAFile(marker)), path)
    with pytest.raises(ValueError, match=OPT_IN):
        PermutedTeacher(str(path))
    assert not marker.exists()
    PermutedTeacher(str(path), trust_pickled_code=True)
    assert marker.exists()


def test_the_cli_refuses_then_fits_with_the_opt_in(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, marker = tmp_path / "t.ckpt", tmp_path / "marker"
    torch.save(_artifact(MLP(hidden_sizes=[8]), CreatesAFile(marker)), path)
    teacher = f"--model.init_args.teacher.init_args.checkpoint_path={path}"
    command = ["fit", "-c", str(DIGITS / "hinton_kd.yaml"), *TINY, teacher]
    code, err = run_cli(command, capsys)
    first = err.strip().splitlines()[0]
    assert code == 2 and not marker.exists()
    assert "would run code" in first and "trust_pickled_code=true" in first
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["t.ckpt"]
    opt_in = "--model.init_args.teacher.init_args.trust_pickled_code=true"
    code, err = run_cli([*command, opt_in], capsys)
    assert code == 0, err
    assert marker.exists() and list(tmp_path.rglob("last.ckpt"))
