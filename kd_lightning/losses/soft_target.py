"""Response-based loss modules: soft targets (Hinton 2015), hard labels, logit matching (Ba & Caruana 2014).

Every loss in :mod:`kd_lightning.losses` follows one contract: ``forward(*, student, teacher,
target=None)``, keyword-only, student first, returning a scalar. Weights and warm-up live in
:class:`kd_lightning.methods.LossTerm`, not in the losses.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.functional.soft_target import (
    hard_label_cross_entropy,
    logit_matching_mse,
    soft_target_kl,
)
from kd_lightning.models.spec import records_init_args
from kd_lightning.validation import positive


@records_init_args
class SoftTargetKLLoss(nn.Module):
    """Soft-target distillation: ``T^2 * KL(softmax(v/T) || softmax(z/T))`` (Hinton et al. 2015).

    Logits ``(B, C)`` or ``(B, L, V)``, student and teacher of one shape (else ``ValueError``);
    the KL is averaged over rows. A teacher logit of ``-inf`` (a masked class) is a probability
    of 0 and its term is 0.

    Args:
        temperature: softening temperature T; must be > 0. Hinton et al. use 1-20; CIFAR
            protocols use 4.
        scale_by_t2: multiply by T^2 so the gradient scale does not depend on T.
    """

    uses_teacher = True

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        self.temperature = positive(
            "temperature", temperature, "Use e.g. temperature: 4.0 (values in 1-20 are common)."
        )
        self.scale_by_t2 = scale_by_t2

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return soft_target_kl(student, teacher, self.temperature, self.scale_by_t2)


@records_init_args
class HardLabelCrossEntropy(nn.Module):
    """Cross-entropy with the hard labels; samples with ``target == -1`` (unlabeled) are ignored."""

    uses_teacher = False

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor | None = None, target: torch.Tensor
    ) -> torch.Tensor:
        return hard_label_cross_entropy(student, target)


@records_init_args
class LogitMatchingMSELoss(nn.Module):
    """Logit regression (Ba & Caruana 2014), Hinton's high-temperature limit.

    ``mean over rows of 1/2 * sum_c (z_c - v_c)^2``, the paper's objective: C/2 times the
    element-wise ``mean((z - v)^2)``. Logits ``(B, C)`` or ``(B, L, V)``, one shape for both. A
    teacher logit of ``-inf`` marks a class outside the output: that entry is left out of the
    sum (nothing to regress).
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return logit_matching_mse(student, teacher)
