"""Fixtures of the method tests: a tiny MLP teacher checkpoint (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.conftest import fast_trainer


@pytest.fixture(scope="session")
def mlp_teacher_checkpoint(tmp_path_factory) -> Path:
    """An MLP(64-64-10) trained for 3 epochs on digits (about 95% test accuracy)."""
    L.seed_everything(0, verbose=False)
    module = Supervised(MLP(hidden_sizes=[64]), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = fast_trainer(max_epochs=3, limit_val_batches=0)
    trainer.fit(module, DigitsTransferSet(batch_size=64, shuffle_seed=0))
    path = tmp_path_factory.mktemp("mlp_teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_accuracy(model: torch.nn.Module, data: DigitsTransferSet) -> float:
    """Top-1 accuracy of ``model`` on the data's test split."""
    test = data.dataset("test")
    model.eval()
    with torch.no_grad():
        return (model(test.inputs).argmax(-1) == test.targets).float().mean().item()


test_accuracy.__test__ = False  # a helper, not a test
