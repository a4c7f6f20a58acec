"""Self-knowledge loss modules: BYOT's hint, the mean teacher's MSE, PS-KD, CS-KD.

Papers: Zhang et al. (ICCV 2019, BYOT), Tarvainen & Valpola (NeurIPS 2017), Kim et al. (ICCV
2021, PS-KD), Yun et al. (CVPR 2020, CS-KD). Equations are in the functional twins
(:mod:`kd_lightning.functional.self_knowledge`).

Contract of :mod:`kd_lightning.losses`: ``forward(*, student, teacher, target=None)``,
keyword-only, student first, a scalar out; the teacher side is detached. They read whatever
knowledge a loss term names, so they work in any method; the self-distillation methods
(:mod:`kd_lightning.methods.self_distillation`, :mod:`kd_lightning.methods.self_knowledge`)
use them by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.functional.self_knowledge import (
    branch_hint,
    class_wise_kl,
    probability_mse,
    progressive_self_kd,
)
from kd_lightning.models.spec import records_init_args
from kd_lightning.objective.schedule import Progress, Schedule
from kd_lightning.validation import positive


@records_init_args
class BranchHintLoss(nn.Module):
    """BYOT's feature hint: ``mean_b ||pool(e_b) - pool(f_b)||^2`` (Zhang et al. 2019).

    ``student`` is a shallow exit's embedding, ``teacher`` the deepest feature (detached);
    both are globally pooled to ``(B, C)`` (spatial or token mean), the squared distance is
    summed over C and averaged over the batch. See
    :func:`~kd_lightning.functional.self_knowledge.branch_hint`.
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return branch_hint(student, teacher)


@records_init_args
class ConsistencyMSELoss(nn.Module):
    """Mean-teacher consistency ``mean_b ||softmax(z_b) - softmax(v_b)||^2`` (Tarvainen & Valpola 2017).

    ``student`` and ``teacher`` are ``(B, C)`` logits; the teacher is detached. Summed over
    classes, mean over the batch. See
    :func:`~kd_lightning.functional.self_knowledge.probability_mse`.
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return probability_mse(student, teacher)


@records_init_args
class PSKDLoss(nn.Module):
    """PS-KD: cross-entropy with targets ``(1 - alpha_t) y + alpha_t softmax(v)`` (Kim et al. 2021).

    ``student``: logits ``(B, C)``; ``teacher``: the model's past logits ``(B, C)`` (PS-KD's
    ``past`` knowledge); ``target``: ``(B,)`` labels (unlabeled samples are left out of the
    mean). The weight grows with training: by default

    .. math:: \\alpha_t = \\alpha_T \\min\\Big(1, \\frac{t + 1}{T}\\Big)

    at epoch t (0-based) of T = ``max_epochs``, as in the authors' code (the paper writes
    :math:`\\alpha_T\\, t / T` with 1-based epochs). ``schedule`` replaces the factor of
    :math:`\\alpha_T` (e.g. :class:`~kd_lightning.objective.LinearRamp` for ``t / T``).

    Args:
        alpha_T: the final weight :math:`\\alpha_T` in [0, 1] (0.8 in the paper).
        schedule: factor of ``alpha_T`` over training; default ``min(1, (t + 1) / T)``.

    Raises:
        ValueError: ``alpha_T`` outside [0, 1]; at the first step, a run without
            ``max_epochs`` and no ``schedule``.
    """

    uses_teacher = True

    def __init__(self, alpha_T: float = 0.8, schedule: Schedule | None = None) -> None:  # noqa: N803
        super().__init__()
        if not 0 <= alpha_T <= 1:
            raise ValueError(f"alpha_T must be in [0, 1], got {alpha_T} (the paper uses 0.8)")
        self.alpha_T = float(alpha_T)
        self.schedule = schedule

    def alpha(self, progress: Progress) -> float:
        """:math:`\\alpha_t` at ``progress``."""
        if self.schedule is not None:
            return self.alpha_T * self.schedule(progress)
        if progress.max_epochs is None or progress.max_epochs <= 0:
            raise ValueError(
                "PSKDLoss grows alpha_t to alpha_T over trainer.max_epochs, which this run does "
                "not set: set trainer.max_epochs, or give the loss a schedule (e.g. "
                "kd_lightning.objective.LinearRamp)"
            )
        return self.alpha_T * min(1.0, (progress.epoch + 1) / progress.max_epochs)

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        alpha = self.alpha(progress if progress is not None else Progress())
        return progressive_self_kd(student, teacher, target, alpha)


@records_init_args
class CSKDLoss(nn.Module):
    """CS-KD's class-wise regulariser ``T^2 KL(softmax(v/T) || softmax(z/T))`` (Yun et al. 2020).

    ``student``: the samples' logits ``(B, C)``. ``teacher``: their same-class partners'
    logits ``(B, C)`` (detached), or ``[partner logits, found]`` with a ``(B,)`` bool mask of
    the rows that have a partner (CS-KD's ``partner`` and ``partner.found`` knowledge): the mean
    is then over those rows only. See
    :func:`~kd_lightning.functional.self_knowledge.class_wise_kl`.

    Args:
        temperature: T > 0 (4 in the paper).
    """

    uses_teacher = True

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = positive("temperature", temperature, "The paper uses 4.")

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        found = None
        if not isinstance(teacher, torch.Tensor):
            teacher, found = teacher
        return class_wise_kl(student, teacher, self.temperature, found)
