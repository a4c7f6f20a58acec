"""Any map-style dataset as a transfer set, and the set-up checks that run before any step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from kd_lightning.data import (
    DatasetTransferSet,
    DigitsTransferSet,
    TransferSet,
    TransferSetDataModule,
    normalise_batch,
)
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP


class Pairs(Dataset):
    """A user's dataset: ``(x, y)`` tuples with a plain int label, no ``targets`` attribute."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class Tokens(Dataset):
    """A tokenized text dataset: dict items as a tokenizer gives them, with ``labels``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        ids = torch.tensor([i % 7 + 1, i % 5 + 1, 0])
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": i % 3}


def digits_pairs(split: str = "train") -> Pairs:
    return Pairs(*DigitsTransferSet().raw_split(split))


def test_labeled_fraction_and_omitted_classes_on_any_dataset():
    wrapped = TransferSet(digits_pairs(), labeled_fraction=0.1, omit_classes=[3])
    full = DigitsTransferSet().raw_split("train")[1]
    kept = full[wrapped.indices]
    assert not (kept == 3).any() and len(wrapped) == int((full != 3).sum())
    labeled = wrapped.targets >= 0
    assert set(wrapped.targets[~labeled].tolist()) == {-1}
    assert torch.equal(wrapped.targets[labeled], kept[labeled])  # kept labels are the true ones
    for c in set(range(10)) - {3}:  # stratified: round(10%) of each class, at least one
        assert int((wrapped.targets == c).sum()) == max(1, round(0.1 * int((full == c).sum())))
    # One selection rule: the library's tensor transfer set makes the same choice.
    digits = DigitsTransferSet(labeled_fraction=0.1, omit_classes=[3]).dataset("train")
    assert torch.equal(wrapped.indices, digits.indices)
    assert torch.equal(wrapped.targets, digits.targets)


def test_items_are_dicts_with_index_and_keep_the_dataset_structure():
    pairs = TransferSet(digits_pairs(), omit_classes=[0])
    item = pairs[0]
    assert set(item) == {"input", "target", "index"}
    assert int(item["index"]) == int(pairs.indices[0]) and item["input"].shape == (1, 8, 8)
    tokens = TransferSet(Tokens(9), labeled_fraction=0.5)
    batch = torch.utils.data.default_collate(tokens.__getitems__([0, 1, 2]))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    normal = normalise_batch(batch)
    assert set(normal["input"]) == {"input_ids", "attention_mask"}
    assert normal["target"].dtype == torch.long and torch.equal(normal["index"], torch.arange(3))


def test_dataset_transfer_set_trains_a_student(tmp_path):
    x, y = DigitsTransferSet().raw_split("train")
    data = DatasetTransferSet(
        train=Pairs(x, y),
        val=digits_pairs("val"),
        num_classes=10,
        batch_size=32,
        labeled_fraction=0.5,
        shuffle_seed=0,
    )
    batch = data.example_batch(4)
    assert batch["input"].shape == (4, 1, 8, 8) and batch["target"].dtype == torch.long
    L.seed_everything(0)
    module = OfflineDistillation(MLP(10, hidden_sizes=[8]), teacher=MLP(10, hidden_sizes=[8]))
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 3
    assert any(
        not torch.equal(a, b) for a, b in zip(before, module.student.parameters(), strict=True)
    )


# ------------------------------------------------------------------------------ set-up checks


class _Steps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


class _Tensors(TransferSetDataModule):
    """A user's tensor transfer set with labels they got wrong."""

    def __init__(self, labels: torch.Tensor, train_rows: int = 8) -> None:
        super().__init__(num_classes=4, batch_size=4)
        self.labels, self.train_rows = labels, train_rows

    def load_split(self, split):
        rows = self.train_rows if split == "train" else 4
        labels = self.labels[:rows] if split == "train" else torch.arange(4)
        return torch.randn(rows, 3), labels


def _fit(data) -> _Steps:
    steps = _Steps()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps],
    )
    module = OfflineDistillation(MLP(4, 3, [4]), teacher=MLP(4, 3, [4]))
    try:
        trainer.fit(module, data)
    finally:
        assert steps.steps == 0  # refused at set-up, before any step
    return steps


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (_Tensors(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])), ValueError, r"train labels.*contain 4"),
        (_Tensors(torch.tensor([0.0, 1, 2, 3] * 2)), TypeError, r"float32.*\.long\(\)"),
        (_Tensors(torch.eye(4).repeat(2, 1)), TypeError, r"one-hot.*argmax"),
        (_Tensors(torch.arange(8), train_rows=0), ValueError, r"train split of _Tensors is empty"),
        (
            DatasetTransferSet(
                train=Pairs(torch.randn(6, 3), torch.tensor([0, 1, 9, 2, 3, 0])), num_classes=4
            ),
            ValueError,
            r"contain 9, outside the valid range 0..3",
        ),
        (
            DatasetTransferSet(train=Pairs(torch.randn(0, 3), torch.zeros(0)), num_classes=4),
            ValueError,
            r"train dataset of DatasetTransferSet is empty",
        ),
    ],
)
def test_bad_labels_and_empty_sets_stop_before_the_first_step(data, error, message):
    with pytest.raises(error, match=message):
        _fit(data)


def test_omitting_every_present_class_is_named():
    data = _Tensors(torch.tensor([1] * 8))
    data.omit_classes = [1]
    with pytest.raises(ValueError, match=r"after omit_classes=\[1\] is empty"):
        data.setup("fit")
