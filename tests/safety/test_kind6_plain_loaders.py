"""Kind 6: with plain DataLoaders (no library data module) the first batch is the example: a
teacher/student class-count mismatch fails before any optimizer step, naming both models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import trainer, unchanged, weights

# Plain training loaders without a validation loader: Lightning's note is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

torch.manual_seed(0)
X, Y = torch.randn(64, 1, 8, 8), torch.arange(64) % 10


def _tuples(**kwargs) -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=16, **kwargs)


def _dicts() -> DataLoader:
    return DataLoader([{"input": X[i], "target": Y[i]} for i in range(64)], batch_size=16)


@pytest.mark.parametrize(
    ("student", "teacher", "loaders", "first", "second"),
    [
        (10, 12, lambda: (_tuples(),), "teacher outputs 12", "student outputs 10"),
        (12, 10, lambda: (_tuples(),), "teacher outputs 10", "student outputs 12"),
        (10, 12, lambda: (_tuples(shuffle=True), _tuples()), "teacher outputs 12", "student"),
        (10, 12, lambda: (_dicts(),), "teacher outputs 12", "student outputs 10"),
    ],
    ids=["teacher 12", "student 12", "with a val loader", "dict batches"],
)
def test_class_count_mismatch_fails_before_the_first_step(
    tmp_path, student, teacher, loaders, first, second
):
    model = OfflineDistillation(
        MLP(num_classes=student, hidden_sizes=[8]),
        FrozenTeacher(MLP(num_classes=teacher, hidden_sizes=[8])),
    )
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(ValueError) as error:
        fit.fit(model, *loaders())
    message = str(error.value)
    assert first in message and second in message and "num_classes" in message
    assert fit.global_step == 0 and unchanged(before, model)


def test_num_classes_given_names_the_model_that_disagrees(tmp_path):
    model = OfflineDistillation(
        MLP(hidden_sizes=[8]), FrozenTeacher(MLP(num_classes=12, hidden_sizes=[8])), num_classes=10
    )
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(ValueError, match="teacher outputs 12 logits but the task has 10 classes"):
        fit.fit(model, _tuples())
    assert fit.global_step == 0 and unchanged(before, model)


def test_matching_sizes_train_with_plain_loaders(tmp_path):
    model = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP(hidden_sizes=[8])))
    fit = trainer(tmp_path)
    fit.fit(model, _tuples())
    assert fit.global_step == 3 and model.num_classes == 10
