"""Studies accept a user's own LightningDataModule (batches as `(input, target)` tuples or as
dicts), check it before training, evaluate it, and print per-epoch lines off a terminal."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kd_lightning.bench.evaluate import evaluate
from kd_lightning.bench.preflight import PreflightError
from kd_lightning.bench.study import run_study
from kd_lightning.bench.study_file import Study
from kd_lightning.teachers import load_student

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"
TEACHER_KEY = "model.init_args.teacher.init_args.checkpoint_path"


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 10-class task: the label is the argmax of the first 10 features."""
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    return x, x[:, :10].argmax(1)


class TupleData(L.LightningDataModule):
    """A plain user data module: `(x, y)` batches, no `num_classes`, nothing from the library."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.splits = {
            name: _split(n, s) for name, n, s in (("train", 96, 0), ("val", 48, 1), ("test", 40, 2))
        }

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(TensorDataset(*self.splits[split]), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class _Dicts(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.x[i], "target": self.y[i]}


class DictData(TupleData):
    """The same data as dict batches (`input`, `target`)."""

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(_Dicts(*self.splits[split]), batch_size=self.batch_size)


class NoTestSplit(TupleData):
    test_dataloader = L.LightningDataModule.test_dataloader


def _config(name: str, data: str) -> dict:
    config = yaml.safe_load((DIGITS / f"{name}.yaml").read_text())
    config["data"] = {"class_path": f"{__name__}.{data}", "init_args": {"batch_size": 32}}
    config["trainer"].update(max_epochs=2, log_every_n_steps=1)
    config["model"]["init_args"]["num_classes"] = 10  # the current base needs it without a link
    if name == "teacher":  # an MLP teacher: the data are 64 features, not 8x8 images
        config["model"]["init_args"]["model"] = {
            "class_path": "kd_lightning.models.MLP",
            "init_args": {"hidden_sizes": [48]},
        }
    return config


def _study(tmp_path: Path, data: str, student_classes: int = 10) -> Study:
    kd = _config("hinton_kd", data)
    kd["model"]["init_args"]["student"]["init_args"]["num_classes"] = student_classes
    spec = {
        "name": "user-data",
        "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "reference_teacher": "teacher",
        "runs": [
            {"name": "teacher", "config": _config("teacher", data)},
            {"name": "kd", "config": kd, "needs": {TEACHER_KEY: "teacher"}},
        ],
    }
    return Study.from_dict(spec)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x).argmax(1)


@pytest.mark.parametrize("data", ["TupleData", "DictData"])
def test_user_datamodule_study_and_its_numbers(tmp_path, data, capsys):
    results = run_study(_study(tmp_path, data))  # echo on, epoch_lines left at its default
    log = capsys.readouterr().out
    assert "preflight: 2 run(s) built and checked" in log
    # stdout is not a terminal here: one line per epoch by default.
    assert "[2/2] kd seed=0 epoch 1/2" in log and "[2/2] kd seed=0 epoch 2/2" in log
    by_run = {r["run"]: r for r in results}
    x, y = _split(40, 2)
    teacher = load_student(by_run["teacher"]["checkpoint"])
    student = load_student(by_run["kd"]["checkpoint"])
    # Test accuracy and agreement recomputed here from the saved checkpoints and the raw split.
    assert by_run["kd"]["test_acc"] == pytest.approx(
        (_predict(student, x) == y).float().mean().item()
    )
    agreement = (_predict(student, x) == _predict(teacher, x)).float().mean().item()
    assert by_run["kd"]["agreement"] == pytest.approx(agreement)
    assert by_run["kd"]["labeled_fraction"] is None and by_run["kd"]["val_is_test"] is False
    assert [len(r["val_acc_curve"]) for r in results] == [2, 2]


def test_user_datamodule_problems_fail_before_training(tmp_path):
    with pytest.raises(PreflightError) as error:  # a 12-class student beside a 10-class teacher
        run_study(_study(tmp_path, "TupleData", student_classes=12), echo=False)
    assert "outputs 12 logits" in error.value.failures["kd"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(PreflightError) as error:
        run_study(_study(tmp_path, "NoTestSplit"), echo=False)
    assert "give the data module a test_dataloader()" in error.value.failures["teacher"]
    assert not (tmp_path / "out").exists()


class KeywordModel(nn.Module):
    """A Hugging Face style model: ``model(features=..., scale=...)`` returns ``.logits``."""

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": features * scale[:, None]}


class _FixedBatches(L.LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.fixed = batches

    def test_dataloader(self) -> list[dict]:
        return copy.deepcopy(self.fixed)


def test_dict_inputs_and_per_token_logits_are_evaluated_with_masks():
    # Dict input: predictions are argmax(features); by hand 3 of the 4 labeled targets match,
    # the unlabeled sample (-1) is not counted in accuracy.
    features = torch.eye(5)[[0, 1, 2, 3, 4]]
    batch = {
        "input": {"features": features, "scale": torch.ones(5)},
        "target": torch.tensor([0, 1, 2, 0, -1]),
    }
    result = evaluate(KeywordModel(), _FixedBatches([batch]), reference=None)
    assert result["test_acc"] == pytest.approx(3 / 4)

    # Per-token logits (B=1, L=4, V=3), position 3 ignored (-100): 2 of 3 counted tokens match.
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]])
    target = torch.tensor([[0, 1, 0, -100]])
    token_batch = {"input": {"features": logits, "scale": torch.ones(1)}, "target": target}

    class Tokens(nn.Module):
        def forward(self, features, scale):
            return features * scale[:, None, None]

    flipped = {"input": {"features": logits.flip(-1), "scale": torch.ones(1)}}

    class Reference(nn.Module):  # the flipped logits: predicts [2, 1, 0, 2]
        def forward(self, features, scale):
            return flipped["input"]["features"]

    result = evaluate(Tokens(), _FixedBatches([token_batch]), reference=Reference())
    assert result["test_acc"] == pytest.approx(2 / 3)
    # student [0, 1, 2, (0)] vs reference [2, 1, 0, (2)] on the 3 counted positions: 1 of 3
    assert result["agreement"] == pytest.approx(1 / 3)
