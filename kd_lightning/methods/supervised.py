"""``Supervised``: one model on hard labels. Trains teachers and the student-alone baseline."""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.objective import LossTerm


class Supervised(DistillationModule):
    """Train ``model`` with cross-entropy on the labeled samples (negative targets are ignored).

    The checkpoint stores ``model`` as the student, so :class:`~kd_lightning.teachers.PretrainedTeacher`
    can load it as the teacher of a distillation run.

    Args:
        model: the network to train.
        loss_terms: the objective; default: the hard-label cross-entropy (``ce``).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    student_args = ("model",)
    teacher_args = ()

    def __init__(
        self,
        model: nn.Module,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if loss_terms is None:
            loss_terms = [LossTerm(HardLabelCrossEntropy(), name="ce", student="model")]
        super().__init__(
            models={"model": model},
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
