"""Lightning decides where it runs: 2-process CPU DDP, bf16-mixed, and the W&B logger offline."""

import csv
import math

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from kd_lightning.bench.wandb_offline import read_offline_run
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher


def _module(teacher_checkpoint):
    return OfflineDistillation(
        MLP(10, hidden_sizes=[16]), PretrainedTeacher(str(teacher_checkpoint))
    )


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ddp_spawn_two_processes(teacher_checkpoint, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=CSVLogger(tmp_path, name="ddp", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(_module(teacher_checkpoint), DigitsTransferSet(batch_size=32))
    rows = _rows(tmp_path / "ddp" / "version_0" / "metrics.csv")
    val = [r for r in rows if r.get("val/acc")]
    assert val and 0.0 <= float(val[-1]["val/acc"]) <= 1.0
    assert any(r.get("train/loss_kd_step") for r in rows)


def test_bf16_mixed(teacher_checkpoint, tmp_path):
    module = _module(teacher_checkpoint)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=CSVLogger(tmp_path, name="bf16", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, DigitsTransferSet(batch_size=32))
    metrics = trainer.callback_metrics
    for key in (
        "train/loss_kd_epoch",
        "train/loss_ce_epoch",
        "val/loss",
        "val/acc",
        "val/agreement",
    ):
        assert math.isfinite(float(metrics[key])), key


def test_wandb_offline_run_logs_every_loss_term(teacher_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="kd-test", name="hinton")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(_module(teacher_checkpoint), DigitsTransferSet(batch_size=32))
    logger.experiment.finish()
    import wandb

    wandb.teardown()  # waits for the W&B service to flush the offline run file
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    for key in (
        "train/loss_kd_epoch",
        "train/loss_ce_epoch",
        "train/loss_kd_step",
        "train/loss_epoch",
        "val/loss_kd",
        "val/acc",
        "val/agreement",
    ):
        assert key in run.metric_keys, f"{key} missing from the W&B run: {sorted(run.metric_keys)}"
