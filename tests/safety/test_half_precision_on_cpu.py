"""A fit at a precision that cannot train on its device (``16-true`` on the CPU: float16 weights
and Adam state without loss scaling go non-finite at the first update) is refused at start-up,
naming ``bf16-mixed`` and ``32-true``; precisions that train, and evaluation at 16-true, run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli, trainer, unchanged, weights

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no",
    "ignore:Checkpoint directory .* exists and is not empty",
)

X, Y = DigitsTransferSet().raw_split("val")


class UserData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(X[:64], Y[:64]), batch_size=16)


RUNS = {
    "digits data module": (lambda: Supervised(MLP(hidden_sizes=[8])), DigitsTransferSet),
    "plain DataLoader": (
        lambda: OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), num_classes=10),
        lambda: DataLoader(TensorDataset(X[:64], Y[:64]), batch_size=16),
    ),
    "user data module": (lambda: Supervised(MLP(hidden_sizes=[8]), num_classes=10), UserData),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_16_true_on_the_cpu_is_refused_before_any_step(tmp_path, run):
    make_model, make_data = RUNS[run]
    model = make_model()
    before = weights(model)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "earlier.ckpt").write_bytes(b"earlier weights")
    fit = trainer(
        tmp_path, precision="16-true", callbacks=[ModelCheckpoint(dirpath=folder)],
        enable_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="'16-true' cannot train on the CPU") as error:
        fit.fit(model, make_data())
    assert "bf16-mixed" in str(error.value) and "32-true" in str(error.value)
    assert fit.global_step == 0 and unchanged(before, model)
    assert [p.name for p in folder.iterdir()] == ["earlier.ckpt"]
    assert (folder / "earlier.ckpt").read_bytes() == b"earlier weights"


def test_the_cli_refuses_it_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["fit", "-c", str(DIGITS / "student_alone.yaml"), *TINY, MLP_MODEL]
    code, err = run_cli([*command, "--trainer.precision=16-true"], capsys)
    first = err.strip().splitlines()[0]
    assert code == 2 and "16-true" in first and "bf16-mixed" in first and "32-true" in first
    assert not Path("runs").exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_precisions_that_train_on_the_cpu_run(tmp_path, precision):
    model = Supervised(MLP(hidden_sizes=[8]))
    fit = trainer(tmp_path, precision=precision, limit_val_batches=0)
    fit.fit(model, DigitsTransferSet(batch_size=32))
    assert fit.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_at_16_true_is_not_refused(tmp_path):
    model = Supervised(MLP(hidden_sizes=[8]))
    data = DigitsTransferSet(batch_size=32)
    trainer(tmp_path, limit_val_batches=0).fit(model, data)
    results = trainer(tmp_path, precision="16-true").validate(model, data)
    assert 0.0 <= results[0]["val/acc"] <= 1.0
