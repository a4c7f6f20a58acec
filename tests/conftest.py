"""Shared fixtures: a tiny trained digits teacher, W&B kept offline, single-threaded torch."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

# Tiny models on 2 cores: one intra-op thread avoids oversubscription (and is faster here).
torch.set_num_threads(1)

for _key in ("WANDB_MODE", "WANDB_SILENT"):
    os.environ.setdefault(_key, "offline" if _key == "WANDB_MODE" else "true")


def fast_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer without logger, checkpoints or progress bar, unless asked."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A SmallCNN(width=32) teacher (the architecture of experiments/digits/teacher.yaml), briefly trained."""
    from kd_lightning.data import DigitsTransferSet
    from kd_lightning.methods import Supervised
    from kd_lightning.models import SmallCNN

    L.seed_everything(0)
    module = Supervised(
        SmallCNN(num_classes=10, width=32), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)
    )
    trainer = fast_trainer(max_epochs=2)
    trainer.fit(module, DigitsTransferSet(batch_size=64))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def vit_teacher_checkpoint(tmp_path_factory) -> Path:
    """A TinyViT(dim 64, depth 4) teacher (experiments/digits/vit_teacher.yaml), barely trained."""
    from kd_lightning.data import DigitsTransferSet
    from kd_lightning.methods import Supervised
    from kd_lightning.models import TinyViT

    L.seed_everything(0)
    module = Supervised(TinyViT(num_classes=10, dim=64, depth=4, heads=4))
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsTransferSet(batch_size=64))
    path = tmp_path_factory.mktemp("vit_teacher") / "vit_teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
