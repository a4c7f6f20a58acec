"""Checkpoints: load_from_checkpoint gives a student ready for inference; resume equals straight."""

import csv

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


def _distiller(teacher_checkpoint):
    return OfflineDistillation(
        MLP(10, hidden_sizes=[16]), PretrainedTeacher(str(teacher_checkpoint))
    )


def test_load_from_checkpoint_and_predict(teacher_checkpoint, tmp_path):
    L.seed_everything(0)
    module = _distiller(teacher_checkpoint)
    data = DigitsTransferSet(batch_size=64)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(module, data)
    path = tmp_path / "s.ckpt"
    trainer.save_checkpoint(path)

    loaded = OfflineDistillation.load_from_checkpoint(path)
    assert loaded.teacher is None  # the student loads alone
    x = data.dataset("test").inputs[:8]
    module.eval()
    torch.testing.assert_close(loaded.eval()(x), module(x))
    student = load_student(path)
    assert isinstance(student, MLP) and not student.training
    torch.testing.assert_close(student(x), module(x))

    probabilities = torch.cat(fast_trainer().predict(loaded, data))
    assert probabilities.shape == (len(data.dataset("test")), 10)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(probabilities)))
    torch.testing.assert_close(probabilities[:8], torch.softmax(module(x), -1))


def _metrics(log_dir):
    with open(log_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/acc")]


def _fit(module, max_epochs, root, ckpt_path=None, name="run"):
    logger = CSVLogger(root, name=name, version=0)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=logger,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=6,
        limit_val_batches=2,
        log_every_n_steps=1,
    )
    trainer.fit(module, DigitsTransferSet(batch_size=32, shuffle_seed=3), ckpt_path=ckpt_path)
    return trainer, logger


def test_resume_equals_uninterrupted(teacher_checkpoint, tmp_path):
    L.seed_everything(0)
    straight = _distiller(teacher_checkpoint)
    _, straight_log = _fit(straight, 4, tmp_path / "straight")

    L.seed_everything(0)
    first = _distiller(teacher_checkpoint)
    _fit(first, 2, tmp_path / "resumed")
    L.seed_everything(0)
    resumed = _distiller(teacher_checkpoint)
    _, resumed_log = _fit(
        resumed,
        4,
        tmp_path / "resumed",
        ckpt_path=tmp_path / "resumed" / "ckpt" / "last.ckpt",
        name="second",
    )

    for key, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    a = _metrics(tmp_path / "straight" / "run" / "version_0")
    b = _metrics(tmp_path / "resumed" / "second" / "version_0")
    assert [r["epoch"] for r in b] == ["2", "3"]
    assert [r["val/acc"] for r in a[2:]] == [r["val/acc"] for r in b]
    assert [r["val/loss"] for r in a[2:]] == [r["val/loss"] for r in b]


def test_supervised_checkpoint_becomes_teacher(tmp_path):
    module = Supervised(MLP(10, hidden_sizes=[8]))
    trainer = fast_trainer(limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsTransferSet())
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    teacher = PretrainedTeacher(str(tmp_path / "t.ckpt"))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(teacher(x), module.eval()(x))
