"""Kind 4: what is visible at start-up fails at start-up. Labels (range, dtype), emptiness and the
optimizer are checked before the first step, and every run of a study is built and checked
before the first one trains."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from kd_lightning.data import DatasetTransferSet, DigitsTransferSet
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.safety.conftest import refused_third_run, trainer, unchanged, weights

X, Y = DigitsTransferSet().raw_split("val")  # (N, 1, 8, 8), (N,)


def _data(train_labels: torch.Tensor, n: int | None = None) -> DatasetTransferSet:
    n = len(train_labels) if n is None else n
    return DatasetTransferSet(
        num_classes=10,
        train=TensorDataset(X[:n], train_labels[:n]),
        val=TensorDataset(X[:32], Y[:32]),
        batch_size=16,
    )


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (Y + 3, ValueError, r"contain 10, 11, 12.*outside the valid range 0\.\.9"),
        (Y + 1, ValueError, "look 1-based.*subtract 1"),
        (Y - 5, ValueError, r"contain -5, -4, -3, -2.*outside the valid range"),
        (Y.float(), TypeError, r"\.long\(\)"),
        (Y.int(), TypeError, r"torch\.long \(int64\)"),
        (torch.nn.functional.one_hot(Y, 10).float(), TypeError, r"argmax"),
    ],
    ids=["above range", "1-based", "negative", "float", "int32", "one-hot"],
)
def test_bad_labels_of_a_data_module_fail_at_setup(tmp_path, labels, error, match):
    model = Supervised(MLP(hidden_sizes=[8]))
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(error, match=match):
        fit.fit(model, _data(labels, n=200))
    assert fit.global_step == 0 and unchanged(before, model)


def test_an_empty_training_set_fails_at_setup(tmp_path):
    model = Supervised(MLP(hidden_sizes=[8]))
    fit = trainer(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        fit.fit(model, _data(Y, n=0))
    assert fit.global_step == 0


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (lambda p: torch.optim.Adam(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=-0.5), "momentum"),
    ],
)
def test_an_optimizer_that_cannot_be_built_fails_with_the_data_checks(tmp_path, optimizer, match):
    model = Supervised(MLP(hidden_sizes=[8]), optimizer=optimizer)
    data = DigitsTransferSet(batch_size=32)
    data.setup("fit")
    with pytest.raises(ValueError, match=rf"{match}.*fix model\.init_args\.optimizer"):
        model.check_example(data.example_batch())  # what a study's preflight calls


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [
        ({"model.init_args.optimizer.init_args.lr": -1.0}, "Invalid learning rate"),
        ({"data.init_args.labeled_fraction": 0.0}, "labeled_fraction must be in (0, 1]"),
        ({"data.init_args.omit_classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}, "omit"),
    ],
    ids=["optimizer", "data argument", "every class omitted"],
)
def test_a_bad_third_run_stops_the_study_before_the_first_trains(tmp_path, bad, sentence):
    message = refused_third_run(tmp_path, bad)
    assert "'third'" in message and sentence in message and "nothing has trained" in message
    assert "'first'" not in message and "'second'" not in message
