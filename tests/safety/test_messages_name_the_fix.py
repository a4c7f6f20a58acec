"""Issue 13, kind 5: messages that named the wrong problem or none, each now one sentence
naming the problem and the fix (printed first and alone by the CLI):

1. ``fit --ckpt_path`` of another method's checkpoint (both methods, and how to use it instead);
2. weights that do not fit the model built (``--ckpt_path`` after changed model arguments, a
   teacher with a wrong ``model=``): the first tensors of another shape, with both shapes;
3. a model whose forward fails on the example batch: which model, the input shape, the fix;
4. labels shaped ``(B, 1)`` or one-hot: squeeze / argmax;
5. an empty teacher or checkpoint path: refused as empty, naming the argument;
6. a file that is not a checkpoint: said so, without torch's advice to turn weights_only off.
"""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.artifact import load_student, read_checkpoint
from kd_lightning.data.batch import TargetGuard
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.forward_errors import ExampleForwardError
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.teachers import FrozenTeacher, PermutedTeacher, PretrainedTeacher
from tests.safety.conftest import DIGITS, TINY, run_cli, trainer, unchanged, weights

# Plain training loaders without a validation loader: Lightning's note is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

TEACHER_PATH = "--model.init_args.teacher.init_args.checkpoint_path"
TORCH_ADVICE = ("will likely succeed", "Re-running", "In PyTorch 2.6")  # torch's own advice


def _first_line_alone(code: int, err: str) -> str:
    """The CLI's error line, asserted to be printed first and alone (exit status 2)."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[0].startswith("kd-lightning: error: "), err
    assert len(lines) == 2 and "Traceback" not in err and "Union" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- 1. another method
def _method_checkpoint(tmp_path, name: str, record_method: str | None, class_path: str | None):
    """A checkpoint whose only trace of its method is the kd_lightning record or LightningCLI's
    ``hyper_parameters._class_path`` (what the refusal reads)."""
    checkpoint = {"state_dict": {}, "hyper_parameters": {}}
    if record_method:
        checkpoint["kd_lightning"] = {"method": record_method, "student_prefix": "student."}
    if class_path:
        checkpoint["hyper_parameters"] = {"_class_path": class_path, "num_classes": 10}
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("config", "saved", "fix"),
    [
        ("hinton_kd.yaml", "supervised", f"{TEACHER_PATH}="),
        (
            "student_alone.yaml",
            "kd_lightning.methods.offline.OfflineDistillation",
            "FromCheckpoint",
        ),
        ("dml.yaml", "supervised", "FromCheckpoint"),
        ("hinton_kd.yaml", "cli:kd_lightning.methods.Supervised", f"{TEACHER_PATH}="),
    ],
    ids=["teacher ckpt into hinton", "kd ckpt into alone", "teacher ckpt into dml", "cli record"],
)
def test_fit_resuming_another_methods_checkpoint_names_both_and_the_fix(
    tmp_path, monkeypatch, capsys, supervised_checkpoint, config, saved, fix
):
    monkeypatch.chdir(tmp_path)
    if saved == "supervised":
        path, saved_name = supervised_checkpoint, "Supervised"
    elif saved.startswith("cli:"):
        path = _method_checkpoint(tmp_path, "cli.ckpt", None, saved[4:])
        saved_name = "Supervised"
    else:
        path = _method_checkpoint(tmp_path, "kd.ckpt", saved, None)
        saved_name = "OfflineDistillation"
    teacher = [f"{TEACHER_PATH}={supervised_checkpoint}"] if config == "hinton_kd.yaml" else []
    args = ["fit", "-c", str(DIGITS / config), *TINY, *teacher, "--ckpt_path", str(path)]
    line = _first_line_alone(*run_cli(args, capsys))
    config_method = {"hinton_kd.yaml": "OfflineDistillation", "student_alone.yaml": "Supervised"}
    assert "another method" in line and saved_name in line
    assert config_method.get(config, "MutualDistillation") in line
    assert "resumes" in line and fix in line
    assert "the following arguments are required" not in line
    assert not list(tmp_path.rglob("*.ckpt")) or saved != "supervised"  # nothing written


def test_fit_resuming_its_own_methods_checkpoint_is_not_refused(supervised_checkpoint):
    from jsonargparse import Namespace

    from kd_lightning.cli_ckpt_path import refuse_resuming_another_method

    model = Namespace(class_path="kd_lightning.methods.Supervised")
    checkpoint = read_checkpoint(supervised_checkpoint)
    refuse_resuming_another_method(checkpoint, model, supervised_checkpoint)  # no error


# --------------------------------------------------------------------------- 2. weights do not fit
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # the config's student is MLP(hidden_sizes=[32]); the checkpoint's MLP(hidden_sizes=[8])
        (None, ["model.hidden.0.0.weight is (8, 64) in the checkpoint but (32, 64) in the model"]),
        (
            "hidden_sizes=[16]",
            ["model.hidden.0.0.weight is (8, 64)", "but (16, 64)", "(3 tensors differ)"],
        ),
        ("hidden_sizes=[8,8]", ["missing from the checkpoint: model.hidden.1.0.weight"]),
    ],
    ids=["config's own arguments", "wider", "deeper"],
)
@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluating_a_checkpoint_with_other_model_arguments_names_both_shapes(
    tmp_path, monkeypatch, capsys, supervised_checkpoint, subcommand, override, expected
):
    monkeypatch.chdir(tmp_path)
    student = [f"--model.init_args.model.init_args.{override}"] if override else []
    args = [subcommand, "-c", str(DIGITS / "student_alone.yaml"), *TINY, *student]
    line = _first_line_alone(*run_cli([*args, "--ckpt_path", str(supervised_checkpoint)], capsys))
    assert "does not fit the model this config builds" in line
    assert all(part in line for part in expected), line
    assert "must match the checkpoint's" in line and "'hidden_sizes': [8]" in line
    assert "Error(s) in loading state_dict" not in line


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (lambda: MLP(hidden_sizes=[16]), "hidden.0.0.weight is (8, 64) in the checkpoint but (16, 64)"),
        (lambda: MLP(hidden_sizes=[8], num_classes=12), "classifier.weight is (10, 8) in the checkpoint but (12, 8)"),
        (lambda: MLP(hidden_sizes=[8, 8]), "missing from the checkpoint: hidden.1.0.weight"),
        (lambda: SmallCNN(width=8), "not in the model: hidden.0.0.weight"),
    ],
    ids=["wider", "more classes", "deeper", "another class"],
)  # fmt: skip
def test_a_teacher_built_with_a_wrong_model_names_both_shapes_and_the_record(
    supervised_checkpoint, model, expected
):
    with pytest.raises(ValueError) as error:
        PretrainedTeacher(str(supervised_checkpoint), model=model())
    message = str(error.value)
    assert expected in message, message
    assert "must match the checkpoint's" in message and "'hidden_sizes': [8]" in message
    assert "leave out model=" in message and "size mismatch for" not in message


# --------------------------------------------------------------------------- 5. empty paths
@pytest.mark.parametrize("empty", ["", " ", "\t\n"], ids=["empty", "space", "blank"])
@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda p: PretrainedTeacher(p), "PretrainedTeacher's checkpoint_path"),
        (lambda p: PermutedTeacher(checkpoint_path=p), "PermutedTeacher's checkpoint_path"),
        (lambda p: load_student(p), "checkpoint"),
    ],
    ids=["pretrained", "permuted", "load_student"],
)
def test_an_empty_path_is_refused_as_empty_naming_the_argument(build, argument, empty):
    with pytest.raises(ValueError) as error:
        build(empty)
    message = str(error.value)
    assert message.startswith(argument) and f"is an empty path ({empty!r})" in message, message
    assert "config.json" not in message and "does not exist" not in message


@pytest.mark.parametrize(
    ("subcommand", "option", "argument"),
    [
        ("fit", f"{TEACHER_PATH}=", "PretrainedTeacher's checkpoint_path"),
        ("fit", f"{TEACHER_PATH}=  ", "PretrainedTeacher's checkpoint_path"),
        ("test", "--ckpt_path=", "--ckpt_path"),
    ],
    ids=["teacher empty", "teacher blank", "ckpt_path empty"],
)
def test_an_empty_path_on_the_command_line(
    tmp_path, monkeypatch, capsys, subcommand, option, argument
):
    monkeypatch.chdir(tmp_path)
    args = [subcommand, "-c", str(DIGITS / "hinton_kd.yaml"), *TINY, option]
    line = _first_line_alone(*run_cli(args, capsys))
    assert f"{argument}" in line and "is an empty path" in line and "config.json" not in line


# --------------------------------------------------------------------------- 6. not a checkpoint
class _NotPlain(argparse.Namespace):
    """A type weights_only loading refuses (the file needs the full unpickler)."""


def _files(tmp_path) -> dict[str, tuple[object, str]]:
    """name -> (path, what the message must say)."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "random.ckpt").write_bytes(
        os.urandom(256).replace(b"\x80", b"\x00").replace(b"PK", b"pk")
    )
    (tmp_path / "notes.txt").write_text("accuracy 0.97\n")
    (tmp_path / "nul.ckpt").write_bytes(b"\x00not a checkpoint" * 10)  # UTF-8, but not text
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "whole.ckpt")
    whole = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    torch.save({"args": _NotPlain(lr=1.0)}, tmp_path / "objects.ckpt")
    return {
        "yaml": (DIGITS / "teacher.yaml", "is not a readable checkpoint: it is a text file"),
        "empty": (tmp_path / "empty.ckpt", "is not a readable checkpoint: it is an empty file"),
        "random": (tmp_path / "random.ckpt", "is not a readable checkpoint: it is a binary file"),
        "nul": (tmp_path / "nul.ckpt", "is not a readable checkpoint: it is a binary file"),
        "text": (tmp_path / "notes.txt", "is not a readable checkpoint: it is a text file"),
        "pickle": (tmp_path / "plain.pkl", "it is a Python pickle but not a PyTorch checkpoint"),
        "truncated": (tmp_path / "truncated.ckpt", "it is a zip archive but not a complete"),
        "objects": (tmp_path / "objects.ckpt", "trust_pickled_code=True"),
    }  # fmt: skip


FILES = ["yaml", "empty", "random", "nul", "text", "pickle", "truncated", "objects"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch reading plain.pkl
@pytest.mark.parametrize("kind", FILES)
def test_a_file_that_is_not_a_checkpoint_says_so_without_torchs_advice(tmp_path, kind):
    path, expected = _files(tmp_path)[kind]
    with pytest.raises(ValueError) as error:
        PretrainedTeacher(str(path))
    message = str(error.value)
    assert expected in message, message
    assert not any(advice in message for advice in TORCH_ADVICE), message
    if kind != "objects":  # the opt-in is offered only for a pickle that needs more types
        assert "trust_pickled_code" not in message and "weights_only" not in message


@pytest.mark.parametrize("kind", ["yaml", "text", "truncated"])
def test_a_file_that_is_not_a_checkpoint_through_the_cli(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    path, expected = _files(tmp_path)[kind]
    for args in (
        ["fit", "-c", str(DIGITS / "hinton_kd.yaml"), *TINY, f"{TEACHER_PATH}={path}"],
        ["test", "-c", str(DIGITS / "student_alone.yaml"), *TINY, "--ckpt_path", str(path)],
    ):
        line = _first_line_alone(*run_cli(args, capsys))
        assert expected in line and not any(a in line for a in TORCH_ADVICE), line


# --------------------------------------------------------------------------- 3. forward fails
def _labels(n: int = 64) -> torch.Tensor:
    return torch.arange(n) % 10


def _loader(inputs: torch.Tensor, target: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(inputs, target), batch_size=16)


@pytest.mark.parametrize(
    ("build", "inputs", "named"),
    [
        (lambda: OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP(hidden_sizes=[8]))),
         (1, 7, 7), "the student (MLP)"),
        (lambda: OfflineDistillation(MLP(in_features=49, hidden_sizes=[8]),
                                     FrozenTeacher(MLP(hidden_sizes=[8]))),
         (1, 7, 7), "the teacher (FrozenTeacher of MLP)"),
        (lambda: Supervised(SmallCNN(in_channels=3, width=8)), (1, 8, 8), "the model (SmallCNN)"),
        (lambda: Supervised(MLP(hidden_sizes=[8])), (3, 8, 8), "the model (MLP)"),
    ],
    ids=["student 8x8 given 7x7", "teacher 8x8 given 7x7", "cnn 3 channels given 1", "mlp rgb"],
)  # fmt: skip
def test_a_model_that_cannot_run_on_the_data_is_named_with_the_input_shape(
    tmp_path, build, inputs, named
):
    model = build()
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(ExampleForwardError) as error:
        fit.fit(model, _loader(torch.randn(64, *inputs), _labels()))
    message = str(error.value)
    assert message.startswith(named) and f"(16, {', '.join(map(str, inputs))})" in message
    assert "input size must match the data" in message
    assert isinstance(error.value.__cause__, RuntimeError)  # torch's error kept as the cause
    assert fit.global_step == 0 and unchanged(before, model)


def test_a_model_that_cannot_run_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    student = "--model.init_args.model.init_args.in_features=49"
    args = ["fit", "-c", str(DIGITS / "student_alone.yaml"), *TINY, student]
    line = _first_line_alone(*run_cli(args, capsys))
    assert "the model (MLP) cannot run on the data" in line and "(2, 1, 8, 8)" in line
    assert not list(tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------- 4. label shapes
@pytest.mark.parametrize(
    ("build", "target", "fix"),
    [
        (lambda: Supervised(MLP(hidden_sizes=[8])), _labels()[:, None], "squeeze the last"),
        (lambda: OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP(hidden_sizes=[8]))),
         _labels()[:, None], "squeeze the last"),
        (lambda: Supervised(MLP(hidden_sizes=[8]), num_classes=10), _labels()[:, None].float(),
         "squeeze the last dimension"),
        (lambda: Supervised(MLP(hidden_sizes=[8])), torch.rand(64, 5), "argmax(-1)"),
        (lambda: Supervised(MLP(hidden_sizes=[8])),
         torch.nn.functional.one_hot(_labels(), 10).float(), "argmax(-1)"),
    ],
    ids=["(B,1) supervised", "(B,1) offline", "(B,1) float", "(B,5) soft", "(B,10) one-hot"],
)  # fmt: skip
def test_labels_that_are_not_b_class_indices_name_the_fix(tmp_path, build, target, fix):
    model = build()
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(TypeError) as error:
        fit.fit(model, _loader(torch.randn(64, 1, 8, 8), target))
    message = str(error.value)
    assert fix in message and "0D or 1D target" not in message, message
    if target.shape[-1] == 1:
        assert "(B,) class indices" in message and "(16, 1)" in message
    assert fit.global_step == 0 and unchanged(before, model)


def test_a_later_batch_of_b_1_labels_names_the_squeeze():
    guard = TargetGuard()
    guard.expect(_labels(16))
    with pytest.raises(TypeError, match=r"\(B, 1\): target.squeeze\(-1\)"):
        guard.screen(_labels(16)[:, None], 10, batch_idx=3, stage="train")
    with pytest.raises(TypeError, match=r"one-hot labels: target.argmax\(-1\)"):
        guard.screen(torch.nn.functional.one_hot(_labels(16), 10), 10, batch_idx=4, stage="train")
