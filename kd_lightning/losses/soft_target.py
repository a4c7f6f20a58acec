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
from kd_lightning.validation import TEMPERATURE_RANGE, positive, within


@records_init_args
class SoftTargetKLLoss(nn.Module):
    """Soft-target distillation: ``T^2 * KL(softmax(v/T) || softmax(z/T))`` (Hinton et al. 2015).

    Logits ``(B, C)`` or ``(B, L, V)``, student and teacher of one shape (else ``ValueError``);
    the KL is averaged over rows. A teacher logit of ``-inf`` (a masked class) is a probability
    of 0 and its term is 0.

    Args:
        temperature: softening temperature T in ``[0.01, 1e4]``. Hinton et al. use 1-20; CIFAR
            protocols use 4.
        scale_by_t2: multiply by T^2 so the gradient scale does not depend on T.

    Why the range: below T = 0.01 a logit gap of 1 is ``exp(-100)`` apart after softening,
    below float32's smallest number, so the soft targets are exactly one-hot (no dark knowledge
    is left) and the T^2-scaled loss and its gradient shrink like ``T x gap`` towards 0: the
    term silently trains nothing. Above T = 1e4 the scaled KL equals its high-temperature limit,
    logit matching (Hinton et al. 2015, section 2.1; :class:`LogitMatchingMSELoss` over C
    classes), to within ``gap / T``, while float32 resolves the differences ``gap / T`` of
    nearly uniform distributions ever more coarsely (the KL itself is computed so that it stays
    >= 0 and accurate to ~0.3% even at T = 1e6, see
    :func:`~kd_lightning.functional.soft_target.soft_target_kl_rows`). Use
    :class:`LogitMatchingMSELoss` for that limit.
    """

    uses_teacher = True

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        positive("temperature", temperature, "Use e.g. temperature: 4.0 (1-20 are common).")
        self.temperature = within(
            "temperature",
            temperature,
            *TEMPERATURE_RANGE,
            "below 0.01 the soft targets are one-hot in float32 and the T^2-scaled loss "
            "vanishes; above 1e4 it is logit matching (use LogitMatchingMSELoss). Use e.g. "
            "temperature: 4.0 (1-20 are common)",
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
