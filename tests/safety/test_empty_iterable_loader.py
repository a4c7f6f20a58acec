"""An empty training loader of unknown length (an ``IterableDataset``) is refused before the
first step, naming the fix; Lightning alone would run an epoch of zero steps and exit 0. Map-style
loaders say they are empty by their length (``tests/safety/test_kind5_messages.py``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.safety.conftest import trainer, unchanged, weights

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no",
    "ignore:Your `IterableDataset` has `__len__` defined",
    "ignore:Checkpoint directory .* exists and is not empty",
)

torch.manual_seed(0)
X, Y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10


class Stream(IterableDataset):
    """Samples ``i`` with ``keep(i)`` (a filter, as a user's stream has)."""

    def __init__(self, keep=lambda i: True, count: int = 40) -> None:
        self.keep, self.count = keep, count

    def __iter__(self):
        return ((X[i], Y[i]) for i in range(self.count) if self.keep(i))


class UserData(L.LightningDataModule):
    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=8)


EMPTY = {
    "no sample": lambda: DataLoader(Stream(count=0), batch_size=8),
    "filtered out": lambda: DataLoader(Stream(keep=lambda i: i > 99), batch_size=8),
    "drop_last": lambda: DataLoader(Stream(count=3), batch_size=8, drop_last=True),
    "data module": lambda: UserData(Stream(count=0)),
}


@pytest.mark.parametrize("limit", [None, 3])
@pytest.mark.parametrize("make", list(EMPTY.values()), ids=list(EMPTY))
def test_an_empty_iterable_training_loader_is_refused_before_any_step(tmp_path, make, limit):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "earlier.ckpt").write_bytes(b"an earlier run's weights")
    model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
    before = weights(model)
    saving = ModelCheckpoint(dirpath=folder, save_last=True)
    fit = trainer(
        tmp_path, limit_train_batches=limit, limit_val_batches=0, callbacks=[saving],
        enable_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="yields no batch") as error:
        fit.fit(model, make())
    assert "IterableDataset" in str(error.value) or "drop_last" in str(error.value)
    assert "batch_size" in str(error.value)
    assert fit.global_step == 0 and unchanged(before, model)
    assert [p.name for p in folder.iterdir()] == ["earlier.ckpt"]
    assert (folder / "earlier.ckpt").read_bytes() == b"an earlier run's weights"


def test_a_non_empty_iterable_loader_trains_every_batch_and_the_same_weights(tmp_path):
    def run(check: bool) -> tuple[int, dict]:
        torch.manual_seed(3)
        model = Supervised(MLP(hidden_sizes=[8]), num_classes=10)
        if not check:
            model.on_train_start = lambda: None  # what Lightning alone does
        fit = trainer(tmp_path, limit_train_batches=None, limit_val_batches=0)
        fit.fit(model, DataLoader(Stream(), batch_size=8))
        return fit.global_step, weights(model)

    steps, checked = run(True)
    plain_steps, plain = run(False)
    assert steps == plain_steps == 5  # 40 samples / 8: the peek consumed nothing of the epoch
    assert all(torch.equal(checked[k], plain[k]) for k in plain)
