"""The batch contract: tuples and Hugging Face dicts normalised, example batches, label checks."""

from __future__ import annotations

from collections import UserDict

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data import DigitsTransferSet, check_targets, example_batch, normalise_batch
from kd_lightning.data.batch import slice_batch


def test_tuple_and_dict_batches():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert set(normalise_batch((x, y))) == {"input", "target"}
    assert normalise_batch([x, y])["input"] is x
    batch = {"input": x, "target": y, "index": torch.arange(4)}
    assert normalise_batch(batch) == batch


def test_hugging_face_style_batch_becomes_model_inputs_and_target():
    ids, mask, labels = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), torch.tensor([1, 0])
    teacher = torch.randn(2, 3)
    # A tokenizer's BatchEncoding is a UserDict, not a dict.
    batch = UserDict(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        index=torch.arange(2),
        teacher_logits=teacher,
    )
    normal = normalise_batch(batch)
    assert set(normal) == {"input", "target", "index", "teacher_logits"}
    assert set(normal["input"]) == {"input_ids", "attention_mask"}
    assert normal["target"] is labels and normal["teacher_logits"] is teacher


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        ({"x": torch.ones(2)}, KeyError, "needs an 'input' entry"),
        ({"labels": torch.ones(2)}, KeyError, "no model inputs"),
        ((torch.ones(2),), TypeError, "of length 1"),
        (torch.ones(2), TypeError, "got Tensor"),
    ],
)
def test_unsupported_batches_say_what_is_accepted(batch, error, message):
    with pytest.raises(error, match=message):
        normalise_batch(batch)


def test_slice_cuts_every_per_sample_entry():
    batch = {
        "input": {"input_ids": torch.arange(12).view(4, 3), "scale": torch.tensor(2.0)},
        "target": torch.arange(4),
    }
    cut = slice_batch(batch, 2)
    assert torch.equal(cut["input"]["input_ids"], torch.arange(6).view(2, 3))
    assert torch.equal(cut["target"], torch.arange(2)) and cut["input"]["scale"] == 2.0


class _TupleData(L.LightningDataModule):
    """A user's own data module: (x, y) tuples, a batch-transfer hook that doubles the input."""

    def train_dataloader(self):
        x = torch.arange(20.0).view(10, 2)
        return DataLoader(TensorDataset(x, torch.arange(10) % 3), batch_size=4)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 2, y


def test_example_batch_of_any_source():
    digits = example_batch(DigitsTransferSet(), size=3)  # the library's own: its example_batch
    assert digits["input"].shape == (3, 1, 8, 8) and set(digits) == {"input", "target", "index"}
    user = example_batch(_TupleData(), size=2)  # first training batch, through the hooks
    assert torch.equal(user["input"], torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    assert torch.equal(user["target"], torch.tensor([0, 1]))
    loader = DataLoader(
        TensorDataset(torch.ones(5, 2), torch.zeros(5, dtype=torch.long)), batch_size=4
    )
    assert example_batch(loader, size=None)["input"].shape == (4, 2)
    empty = DataLoader(TensorDataset(torch.ones(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="yields no batch: the training set is empty"):
        example_batch(empty)


# -------------------------------------------------------------------------------- label checks


def test_valid_labels_pass_with_ignore_values():
    check_targets(torch.tensor([0, 9, -1, 3]), 10)
    check_targets(torch.tensor([[0, 4, -100], [1, -100, -100]]), 10)  # per token
    check_targets(torch.zeros(0, dtype=torch.long), 10)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([0.0, 1.0, 2.0]), r"dtype torch.float32.*\.long\(\)"),
        (torch.eye(4)[[0, 2, 1]], r"one-hot or soft labels.*argmax"),
        (torch.softmax(torch.randn(3, 4), -1), r"one-hot or soft labels"),
        (torch.eye(4, dtype=torch.long)[[0, 2, 1]], r"look one-hot.*argmax"),
        (torch.tensor([0, 1], dtype=torch.int32), r"torch.int32.*\.long\(\)"),
        (torch.tensor([True, False]), r"dtype torch.bool"),
        ([0, 1, 2], r"must be a tensor"),
    ],
)
def test_float_one_hot_and_other_dtypes_are_refused_with_the_fix(target, message):
    with pytest.raises(TypeError, match=message):
        check_targets(target, 4, "the train labels")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([0, 3, 12, 10]), r"contain 10, 12, outside the valid range 0..9.*13 classes"),
        (torch.tensor([1, 2, 10]), r"look 1-based \(1..10\): subtract 1"),
        (torch.tensor([0, -2, -1]), r"contain -2"),
    ],
)
def test_labels_out_of_range_are_named(target, message):
    with pytest.raises(ValueError, match=message):
        check_targets(target, 10, "the train labels")
