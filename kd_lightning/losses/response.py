"""Response-based loss modules: DKD (Zhao et al. 2022), logit standardization (Sun et al. 2024), DIST (Huang et al. 2022).

Contract of :mod:`kd_lightning.losses`: ``forward(*, student, teacher, target=None)``,
keyword-only, student first, returning a float32 scalar (float64 for float64 inputs).
Equations are in the functional twins
(:mod:`kd_lightning.functional.response`). Term weights and warm-up live in the loss term that
wraps a loss, not here: DKD's ``alpha``/``beta`` and DIST's ``beta``/``gamma`` are part of
those papers' equations, but DKD's warm-up ``min(epoch / warmup, 1)`` is the wrapper's job.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.functional.response import (
    DKD_UNLABELED_CHOICES,
    decoupled_kd,
    dist_loss,
    logit_standardization_kd,
)
from kd_lightning.models.spec import records_init_args
from kd_lightning.validation import non_negative, positive

_check_positive = positive
_check_non_negative = non_negative


@records_init_args
class DKDLoss(nn.Module):
    """Decoupled Knowledge Distillation: ``T^2 (alpha * TCKD + beta * NCKD)`` (Zhao et al., CVPR 2022).

    TCKD matches the binary target / non-target probabilities, NCKD the distribution among the
    non-target classes. Needs ``target``; samples with ``target == -1`` are left out of the
    batch mean (``unlabeled="ignore"``) or take the teacher's top-1 class as their label
    (``unlabeled="teacher_argmax"``). The paper's warm-up of the whole term (20 epochs on
    CIFAR-100) belongs to the wrapping loss term's schedule.

    Args:
        alpha: TCKD weight (paper: 1.0).
        beta: NCKD weight (paper: 8.0 on CIFAR-100, 0.5 on ImageNet).
        temperature: softmax temperature T > 0 (paper: 4 on CIFAR-100, 1 on ImageNet).
        unlabeled: what to do with ``target == -1``: ``"ignore"`` or ``"teacher_argmax"``.
    """

    uses_teacher = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        unlabeled: str = "ignore",
    ) -> None:
        super().__init__()
        self.alpha = _check_non_negative("alpha", alpha, "The paper uses alpha: 1.0.")
        self.beta = _check_non_negative("beta", beta, "The paper uses beta: 8.0 (CIFAR-100).")
        self.temperature = _check_positive(
            "temperature", temperature, "Use e.g. temperature: 4.0 (CIFAR-100) or 1.0 (ImageNet)."
        )
        if unlabeled not in DKD_UNLABELED_CHOICES:
            raise ValueError(
                f"unlabeled must be one of {DKD_UNLABELED_CHOICES}, got {unlabeled!r}."
            )
        self.unlabeled = unlabeled

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        if target is None:
            raise ValueError(
                "DKDLoss needs target (the class labels): TCKD and NCKD split the classes into "
                "target and non-target. Pass target=batch['target']."
            )
        return decoupled_kd(
            student, teacher, target, self.alpha, self.beta, self.temperature, self.unlabeled
        )


@records_init_args
class LogitStandardizationKDLoss(nn.Module):
    """KD on Z-score standardised logits (Sun et al., CVPR 2024, "Logit Standardization in KD").

    Each row of logits, teacher's and student's, is shifted to zero mean and divided by its
    standard deviation (plus ``eps``) times a base temperature before the softened KL; the loss
    is scaled by the base temperature squared. The standard deviation is the unbiased one
    (``1/(C-1)``) of the authors' released code by default; the functional twin
    (:func:`kd_lightning.functional.logit_standardization_kd`) explains the choice. A ``-inf``
    teacher logit is a masked class: the statistics use the finite entries, and its
    probability is 0.

    Args:
        temperature: base temperature tau > 0 (authors: 2 on CIFAR-100).
        eps: added to the standard deviation to guard constant logits (authors: 1e-7).
        unbiased: ``True`` (authors' code) for the ``1/(C-1)`` standard deviation, ``False``
            for the population (``1/C``) one.
    """

    uses_teacher = True

    def __init__(self, temperature: float = 2.0, eps: float = 1e-7, unbiased: bool = True) -> None:
        super().__init__()
        self.temperature = _check_positive(
            "temperature", temperature, "Use e.g. temperature: 2.0 (the base temperature)."
        )
        self.eps = _check_positive("eps", eps, "Use e.g. eps: 1.0e-7.")
        if not isinstance(unbiased, bool):
            raise ValueError(f"unbiased must be true or false, got {unbiased!r}.")
        self.unbiased = unbiased

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return logit_standardization_kd(student, teacher, self.temperature, self.eps, self.unbiased)


@records_init_args
class DISTLoss(nn.Module):
    """DIST: inter- and intra-class Pearson relations of predictions (Huang et al., NeurIPS 2022).

    ``tau^2 * (beta * mean_i(1 - pearson(rows)) + gamma * mean_j(1 - pearson(columns)))`` of the
    softened prediction matrices ``(B, C)``. The batch needs at least two samples.

    Args:
        beta: inter-class (per-sample) relation weight (paper: 1).
        gamma: intra-class (per-class, across the batch) relation weight (paper: 1).
        temperature: softmax temperature tau > 0 (paper: 1).
        eps: guards the correlation of constant vectors.
    """

    uses_teacher = True

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.beta = _check_non_negative("beta", beta, "The paper uses beta: 1.0.")
        self.gamma = _check_non_negative("gamma", gamma, "The paper uses gamma: 1.0.")
        self.temperature = _check_positive(
            "temperature", temperature, "The paper uses temperature: 1.0."
        )
        self.eps = _check_positive("eps", eps, "Use e.g. eps: 1.0e-8.")

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dist_loss(student, teacher, self.beta, self.gamma, self.temperature, self.eps)
