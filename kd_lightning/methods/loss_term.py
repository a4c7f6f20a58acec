"""A weighted term of a distillation objective: which loss, on which knowledge, with what weight.

Weights and warm-up live here, once, instead of in every loss.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

LOGITS = "logits"
"""Source name of a model's output logits; any other source names a hooked layer."""


def _snake_name(loss: nn.Module) -> str:
    name = type(loss).__name__.removesuffix("Loss") or type(loss).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class LossTerm(nn.Module):
    """One term ``weight * warmup(epoch) * loss(student=..., teacher=..., target=...)``.

    Args:
        loss: a loss module from :mod:`kd_lightning.losses` (or any module with the
            ``forward(*, student, teacher, target=None)`` contract).
        weight: the term's weight in the total loss.
        name: name of the term in logs (``train/loss_<name>``); default: from the loss class.
        student: what the loss sees of the student: ``"logits"`` or a hooked layer path
            (a list of paths for losses over layer pairs).
        teacher: the same for the teacher.
        connector: module applied to the student's knowledge before the loss (reconciles
            shapes); trained with the student.
        warmup_epochs: the weight ramps linearly from ``weight / warmup_epochs`` (first epoch) to
            ``weight`` over this many epochs (DKD uses 20); 0 disables the ramp.
        pretrain_epochs: a first stage of this many epochs in which only the terms with
            ``pretrain_epochs`` train (FitNets stage 1: the hint and its connector train the
            student's lower layers before the full objective); 0: no such stage.
    """

    def __init__(
        self,
        loss: nn.Module,
        weight: float = 1.0,
        name: str | None = None,
        student: str | list[str] = LOGITS,
        teacher: str | list[str] = LOGITS,
        connector: nn.Module | None = None,
        warmup_epochs: int = 0,
        pretrain_epochs: int = 0,
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight of a loss term must be >= 0, got {weight}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
        self.loss = loss
        self.weight = float(weight)
        self.name = name or _snake_name(loss)
        self.student_source = student
        self.teacher_source = teacher
        self.connector = connector
        self.warmup_epochs = warmup_epochs
        self.pretrain_epochs = pretrain_epochs
        parameters = inspect.signature(loss.forward).parameters
        self.takes_index = "index" in parameters
        self.uses_teacher = bool(getattr(loss, "uses_teacher", True))

    def layer_names(self, side: str) -> list[str]:
        """Hooked layer paths this term reads on ``side`` ("student" or "teacher")."""
        source = self.student_source if side == "student" else self.teacher_source
        names = [source] if isinstance(source, str) else list(source)
        return [n for n in names if n != LOGITS]

    def scale(self, epoch: int) -> float:
        if self.warmup_epochs == 0:
            return self.weight
        return self.weight * min(1.0, (epoch + 1) / self.warmup_epochs)

    def scale_in(self, terms: list[LossTerm], epoch: int) -> float:
        """This term's weight at ``epoch`` within ``terms``: 0 while other terms pre-train alone."""
        if any(t.pretrain_epochs > epoch for t in terms) and self.pretrain_epochs <= epoch:
            return 0.0
        return self.scale(epoch)

    @staticmethod
    def _select(source: str | list[str], knowledge: dict[str, torch.Tensor]):
        if isinstance(source, str):
            return knowledge[source]
        return [knowledge[s] for s in source]

    def forward(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor] | None,
        target: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unweighted loss value from the knowledge dicts (source name -> tensor)."""
        s = self._select(self.student_source, student)
        if self.connector is not None:
            s = self.connector(s)
        t = (
            self._select(self.teacher_source, teacher)
            if self.uses_teacher and teacher is not None
            else None
        )
        kwargs = {"index": index} if self.takes_index else {}
        return self.loss(student=s, teacher=t, target=target, **kwargs)
