"""Bad labels only in later batches of a user's data (plain DataLoaders, a LightningDataModule
without ``example_batch``): every batch's labels are checked in its step (``TargetGuard``), so
the bad batch takes no optimizer step and the message names the batch, the values, the class
count and the fix. On an accelerator the range check is a device mask read where the non-finite
guard already reads its flags (tested here with ``defer=True`` on the CPU)."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data.batch import InvalidTargets, TargetGuard
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher
from tests.safety.conftest import trainer

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

torch.manual_seed(0)
N, BATCH, BAD_BATCH = 96, 16, 3
X, Y = torch.randn(N, 1, 8, 8), torch.arange(N) % 10
ROWS = slice(BAD_BATCH * BATCH, (BAD_BATCH + 1) * BATCH)


def _labels(value: int) -> torch.Tensor:
    labels = Y.clone()
    labels[ROWS.start + 5] = value
    return labels


class LaterBatches(torch.utils.data.Dataset):
    """Long labels in the first batches, ``bad(target)`` from batch ``BAD_BATCH`` on."""

    def __init__(self, bad) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return X[i], self.bad(Y[i]) if i >= ROWS.start else Y[i]


class UserData(L.LightningDataModule):
    """A user's data module: no example_batch(), no num_classes."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH)


RANGE = [
    (_labels(12), r"contain 12, outside the valid range 0\.\.9 for num_classes=10"),
    (_labels(10), r"contain 10, outside the valid range 0\.\.9"),
    (_labels(-5), r"contain -5, outside the valid range 0\.\.9"),
]


@pytest.mark.parametrize(("labels", "values"), RANGE, ids=["12", "10", "-5"])
@pytest.mark.parametrize("source", ["DataLoader", "data module"])
def test_out_of_range_labels_in_a_later_batch_stop_before_its_step(
    tmp_path, labels, values, source
):
    data = DataLoader(TensorDataset(X, labels), batch_size=BATCH)
    if source == "data module":
        data = UserData(TensorDataset(X, labels))
    model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
    fit = trainer(tmp_path, limit_train_batches=None, limit_val_batches=0)
    with pytest.raises(InvalidTargets, match=values) as error:
        fit.fit(model, data)
    message = str(error.value)
    assert f"train batch {BAD_BATCH}" in message and "Fix the dataset's labels" in message
    assert fit.global_step == BAD_BATCH  # the batches before it stepped, the bad one did not


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda t: t.float(), r"train batch 3 have dtype torch\.float32.*\.long\(\)"),
        (lambda t: t.int(), r"train batch 3 have dtype torch\.int32.*torch\.long"),
        (lambda t: torch.nn.functional.one_hot(t, 10), r"shape \(16, 10\).*argmax"),
        (lambda t: torch.nn.functional.one_hot(t, 10).float(), r"one-hot.*argmax"),
    ],
    ids=["float", "int32", "one-hot long", "one-hot float"],
)
def test_labels_of_another_dtype_or_shape_in_a_later_batch_stop_before_its_step(
    tmp_path, bad, match
):
    model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
    fit = trainer(tmp_path, limit_train_batches=None, limit_val_batches=0)
    with pytest.raises(TypeError, match=match):
        fit.fit(model, DataLoader(LaterBatches(bad), batch_size=BATCH))
    assert fit.global_step == BAD_BATCH


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_the_teacher_file_and_earlier_checkpoints_are_byte_identical(
    tmp_path, supervised_checkpoint
):
    teacher_bytes = supervised_checkpoint.read_bytes()
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    finished = folder / "finished.ckpt"  # an earlier run's artifact in the folder this run uses
    finished.write_bytes(teacher_bytes)
    model = OfflineDistillation(
        MLP(hidden_sizes=[8]), PretrainedTeacher(str(supervised_checkpoint)), num_classes=10
    )
    saving = ModelCheckpoint(dirpath=folder, every_n_train_steps=2)
    fit = trainer(
        tmp_path, limit_train_batches=None, limit_val_batches=0, callbacks=[saving],
        enable_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(InvalidTargets, match="contain 11"):
        fit.fit(model, DataLoader(TensorDataset(X, _labels(11)), batch_size=BATCH))
    assert supervised_checkpoint.read_bytes() == teacher_bytes
    assert finished.read_bytes() == teacher_bytes
    # Step 2 (batches 0-1) was saved; nothing after the bad batch 3.
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "finished.ckpt"]


@pytest.mark.parametrize(("labels", "low", "high"), [(_labels(12), 12, 12), (Y * 3 - 5, -5, 22)])
def test_on_an_accelerator_bad_labels_are_masked_then_raised_at_the_next_read(labels, low, high):
    guard = TargetGuard()
    guard.expect(Y[:BATCH])
    target = labels[ROWS]
    screened = guard.screen(target, 10, BAD_BATCH, "train", defer=True)  # no raise, no sync
    valid = (target >= 0) & (target < 10)
    assert torch.equal(screened[valid], target[valid]) and (screened[~valid] == -1).all()
    guard.screen(Y[:BATCH] + 20, 10, BAD_BATCH + 1, "train", defer=True)  # the first bad is kept
    with pytest.raises(InvalidTargets) as error:
        guard.raise_if_tripped()
    message = str(error.value)
    values = str(low) if low == high else f"values from {low} to {high}"
    assert f"batch {BAD_BATCH}" in message and f"contain {values}," in message
    assert "num_classes=10" in message and "no checkpoint is written" in message


def test_the_deferred_check_stops_a_fit_where_the_nonfinite_guard_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(
        TargetGuard, "screen", functools.partialmethod(TargetGuard.screen, defer=True)
    )
    folder = tmp_path / "checkpoints"
    saving = ModelCheckpoint(dirpath=folder, save_last=True)
    model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
    fit = trainer(
        tmp_path, limit_train_batches=None, limit_val_batches=0, callbacks=[saving],
        enable_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(InvalidTargets, match=f"batch {BAD_BATCH}.*contain 12"):
        fit.fit(model, DataLoader(TensorDataset(X, _labels(12)), batch_size=BATCH))
    assert not folder.exists() or not list(folder.iterdir())


class FirstTwoValid(torch.utils.data.Dataset):
    """1-based labels 1..10 whose first two samples are 3 and 5 (valid for 10 classes)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return X[i], torch.tensor([3, 5][i] if i < 2 else i % 10 + 1)


def test_the_start_up_hint_rests_on_the_whole_first_batch(tmp_path):
    model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
    fit = trainer(tmp_path, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"look 1-based \(1\.\.10\): subtract 1"):
        fit.fit(model, UserData(FirstTwoValid()))
    assert fit.global_step == 0
