"""``Supervised``: one model on hard labels. Trains teachers and the student-alone baseline."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.functional.soft_target import hard_label_cross_entropy
from kd_lightning.methods.base import DistillationModule, _default_optimizer


class Supervised(DistillationModule):
    """Train ``model`` with cross-entropy on the labeled samples (``target == -1`` is ignored).

    The checkpoint stores ``model`` as the student, so :class:`~kd_lightning.teachers.PretrainedTeacher`
    can load it as the teacher of a distillation run.

    Args:
        model: the network to train.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    student_arg = "model"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.student = self.build_model(model)
        self.record_student_spec(self.student)

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"student": self(batch["input"]), "teacher": None}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        ce = hard_label_cross_entropy(outputs["student"], batch["target"])
        return {"loss": ce, "ce": ce}
