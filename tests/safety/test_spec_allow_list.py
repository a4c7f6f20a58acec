"""Kind 8, the recipe: a checkpoint read with ``weights_only=True`` still carries the student's
``{"class_path", "init_args"}`` recipe. Building it may only construct allowed classes (models,
loss terms, schedules, synthesisers): a recipe that names a function, another class, or sets a
trust opt-in is refused before anything is called, through every entry point that reads one.
Each recipe below creates a marker file when it is run; the marker must never exist."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kd_lightning.artifact import load_student
from kd_lightning.callbacks import load_compressed_student
from kd_lightning.export_command import ExportCommandError, export_checkpoint
from kd_lightning.losses import SoftTargetKLLoss
from kd_lightning.methods import LossTerm, Supervised
from kd_lightning.models import MLP, FromCheckpoint
from kd_lightning.models.spec import UnsafeSpecError, instantiate, model_spec, object_spec
from kd_lightning.objective import LinearWarmup
from kd_lightning.teachers import PretrainedTeacher
from tests.safety.conftest import DIGITS, run_cli

MLP_PATH = "kd_lightning.models.MLP"


class CreatesAFile:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def recipes(marker: Path, tmp_path: Path) -> dict[str, dict]:
    """Recipes that each create ``marker`` when built by an unchecked builder."""
    trap = tmp_path / "trap.pkl"
    torch.save({"state_dict": CreatesAFile(marker)}, trap)
    opener = {"class_path": "builtins.open", "init_args": {"file": str(marker), "mode": "w"}}
    return {
        "function subprocess.run": {
            "class_path": "subprocess.run",
            "init_args": {"args": f"touch '{marker}'", "shell": True},
        },
        "builtin open": opener,
        "class outside the list (Popen)": {
            "class_path": "subprocess.Popen",
            "init_args": {"args": ["touch", str(marker)]},
        },
        "nested in a model's init_args": {
            "class_path": MLP_PATH,
            "init_args": {"hidden_sizes": [8], "extra": [opener]},
        },
        "Lightning's _class_path form": {"_class_path": "builtins.open", **opener["init_args"]},
        "allowed class, trust opt-in from the file": {
            "class_path": "kd_lightning.teachers.PretrainedTeacher",
            "init_args": {"checkpoint_path": str(trap), "trust_pickled_code": True},
        },
    }


def forged(tmp_path: Path, recipe: dict) -> Path:
    """A real checkpoint of a trained-looking MLP whose recorded recipes are ``recipe``."""
    student = MLP(hidden_sizes=[8])
    path = tmp_path / "downloaded.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in student.state_dict().items()},
            "hyper_parameters": {"num_classes": None},
            "kd_lightning": {
                "format": 2, "student_spec": recipe, "student_prefix": "model.",
                "method": "kd_lightning.methods.supervised.Supervised",
                "init_specs": {"model": recipe}, "unrecorded": {},
            },
        },
        path,
    )  # fmt: skip
    return path


ENTRY_POINTS = {
    "load_student": load_student,
    "FromCheckpoint": lambda p: FromCheckpoint(str(p)),
    "PretrainedTeacher (a teacher file)": lambda p: PretrainedTeacher(str(p)),
    "Supervised.load_from_checkpoint": Supervised.load_from_checkpoint,
    "load_compressed_student": load_compressed_student,
    "instantiate": lambda p: instantiate(torch.load(p)["kd_lightning"]["student_spec"]),
}


def absent(marker: Path) -> bool:
    time.sleep(0.05)  # Popen's child, had it started, would have touched the file by now
    return not marker.exists()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def test_every_python_entry_point_refuses_every_recipe_before_calling_anything(tmp_path, entry):
    marker = tmp_path / "PWNED"
    for name, recipe in recipes(marker, tmp_path).items():
        path = forged(tmp_path, recipe)
        with pytest.raises(ValueError) as error:
            ENTRY_POINTS[entry](path)
        assert absent(marker), f"{name}: the recipe ran through {entry}"
        text = str(error.value)
        assert "arbitrary callable" in text and "trust_pickled_code=True does not" in text, name
        named = recipe.get("class_path", recipe.get("_class_path"))
        if "nested" in name:
            named = "builtins.open"
        assert repr(named) in text, (name, text)


def test_a_trust_opt_in_in_hyper_parameters_is_refused_too(tmp_path):
    marker = tmp_path / "PWNED"
    recipe = recipes(marker, tmp_path)["allowed class, trust opt-in from the file"]
    path = forged(tmp_path, {"class_path": MLP_PATH, "init_args": {"hidden_sizes": [8]}})
    checkpoint = torch.load(path)
    checkpoint["kd_lightning"]["init_specs"] = {}
    checkpoint["hyper_parameters"]["model"] = recipe
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeSpecError, match="trust_pickled_code=true taken from a file"):
        Supervised.load_from_checkpoint(path)
    assert absent(marker)


def test_export_refuses_the_recipe_in_python_and_on_the_command_line(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    for recipe in list(recipes(marker, tmp_path).values())[:3]:
        path = forged(tmp_path, recipe)
        with pytest.raises(ExportCommandError, match="arbitrary callable"):
            export_checkpoint(path, output=tmp_path / "s.onnx")
        monkeypatch.chdir(tmp_path)
        code, err = run_cli(["export", f"--checkpoint={path}", "--output=c.onnx"], capsys)
        assert code == 2 and "arbitrary callable" in err.strip().splitlines()[0]
        assert absent(marker)
        assert not list(tmp_path.rglob("*.onnx"))


def test_fit_with_the_file_as_teacher_refuses_before_training(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    path = forged(tmp_path, recipes(marker, tmp_path)["function subprocess.run"])
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(
        ["fit", "-c", str(DIGITS / "hinton_kd.yaml"),
         f"--model.init_args.teacher.init_args.checkpoint_path={path}",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"],
        capsys,
    )  # fmt: skip
    assert code != 0 and absent(marker)
    assert "'subprocess.run'" in err and "arbitrary callable" in err
    assert not list(tmp_path.rglob("*.ckpt"))[1:]  # only the forged file


def test_every_allowed_kind_our_checkpoints_record_still_builds():
    term = LossTerm(name="kd", loss=SoftTargetKLLoss(temperature=2.0), schedule=LinearWarmup(3))
    student = MLP(hidden_sizes=[8])
    rebuilt_term = instantiate(object_spec(term))
    assert isinstance(rebuilt_term, LossTerm) and isinstance(rebuilt_term.schedule, LinearWarmup)
    assert isinstance(instantiate(model_spec(student)), MLP)
    synthesiser = instantiate(
        {"class_path": "kd_lightning.synthesis.DeepInversion", "init_args": {}}
    )
    assert type(synthesiser).__name__ == "DeepInversion"
    assert instantiate([{"class_path": "torch.nn.ReLU"}, 3]).__len__() == 2


# A trust opt-in may hide at any depth of a recorded spec or of a checkpoint's hyperparameters
# (a Hugging Face model's `config` dict, a teacher spec inside the method's arguments).
@pytest.mark.parametrize(
    "tree",
    [
        {
            "class_path": "kd_lightning.models.HFModel",
            "init_args": {"model_type": "gpt2", "config": {"trust_remote_code": True}},
        },
        {
            "class_path": "kd_lightning.models.MLP",
            "init_args": {"hidden_sizes": [8], "extra": [{"deep": {"trust_pickled_code": 1}}]},
        },
        {
            "class_path": "kd_lightning.teachers.PretrainedTeacher",
            "init_args": {"checkpoint_path": "x.ckpt", "trust_pickled_code": True},
        },
    ],
    ids=["hf-config", "nested-list", "teacher"],
)
def test_a_trust_opt_in_at_any_depth_of_a_recorded_spec_is_refused(tree):
    from kd_lightning.models.spec import UnsafeSpecError, instantiate

    with pytest.raises(UnsafeSpecError, match="trust"):
        instantiate(tree)


def test_cli_refuses_a_trust_opt_in_in_the_hyperparameters_of_ckpt_path(tmp_path):
    import subprocess
    import sys

    import torch

    from kd_lightning.models import MLP

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in MLP().state_dict().items()},
            "hyper_parameters": {
                "student": {"class_path": "kd_lightning.models.MLP", "init_args": {}},
                "teacher": {"class_path": "kd_lightning.teachers.PretrainedTeacher",
                            "init_args": {"checkpoint_path": str(tmp_path / "pick.ckpt"),
                                          "trust_pickled_code": True}},
            },
        },
        ckpt,
    )  # fmt: skip
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "kd_lightning", "test", "-c",
         str(root / "experiments/digits/hinton_kd.yaml"), f"--ckpt_path={ckpt}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and not marker.exists()
    assert "trust_pickled_code=true taken from a file" in out.stderr, out.stderr[-2000:]
