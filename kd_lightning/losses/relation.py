"""Relation-based loss modules: RKD, similarity preserving, correlation congruence, PKT.

Papers: Park et al. (CVPR 2019), Tung & Mori (ICCV 2019), Peng et al. (ICCV 2019), Passalis &
Tefas (ECCV 2018). Equations are in the functional twins
(:mod:`kd_lightning.functional.relation`).

Contract of :mod:`kd_lightning.losses`: ``forward(*, student, teacher, target=None)``,
keyword-only, student first, returning a float32 scalar (float64 for float64 inputs). Inputs
are ``(B, ...)`` features (flattened to ``(B, D)``); student and teacher widths may differ,
batch sizes may not. These losses compare samples of one batch with each other, so they need
B >= 2 (and more to be informative).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.functional.relation import (
    CC_KERNEL_CHOICES,
    PKT_FORMS,
    correlation_congruence,
    probabilistic_knowledge_transfer,
    relational_kd,
    similarity_preserving,
)
from kd_lightning.models.spec import records_init_args


@records_init_args
class RKDLoss(nn.Module):
    """Relational KD (Park et al., CVPR 2019): Huber loss on distance and angle potentials.

    Distances are normalised by the batch's mean pairwise distance, angles are cosines of
    triplets; both are scale-invariant, so student and teacher embeddings need neither the
    same width nor the same scale.

    Args:
        distance_weight: weight of the distance-wise term (paper: 25; 0 disables it).
        angle_weight: weight of the angle-wise term (paper: 50; 0 disables it).
        eps: numerical guard for square roots and the mean distance.
    """

    uses_teacher = True

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12
    ) -> None:
        super().__init__()
        for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if not value >= 0:
                raise ValueError(
                    f"{name} must be >= 0, got {value}. The paper uses distance_weight: 25.0 "
                    "and angle_weight: 50.0."
                )
        if distance_weight == 0 and angle_weight == 0:
            raise ValueError(
                "distance_weight and angle_weight are both 0, so the loss is identically 0. "
                "Set at least one (paper: 25.0 and 50.0)."
            )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}. Use e.g. eps: 1.0e-12.")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.eps = float(eps)

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return relational_kd(student, teacher, self.distance_weight, self.angle_weight, self.eps)


@records_init_args
class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ``||G_T - G_S||_F^2 / b^2``.

    ``G`` is the batch Gram matrix ``Q Q^T`` of the flattened activations with each row
    L2-normalised, so activations of any width (and scale) can be compared.
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return similarity_preserving(student, teacher)


@records_init_args
class CorrelationCongruenceLoss(nn.Module):
    """Correlation congruence (Peng et al., ICCV 2019): match the batch correlation matrices.

    ``mean((psi(F_t) - psi(F_s))^2)`` over the ``B x B`` matrix, where ``psi`` is a kernel of
    the L2-normalised embeddings: the paper's Gaussian RBF through a Taylor expansion of order
    ``order`` (default), or the bilinear kernel (cosine similarity).

    Args:
        kernel: ``"gaussian"`` (Taylor-expanded RBF) or ``"bilinear"``.
        gamma: RBF bandwidth, > 0 (gaussian only).
        order: Taylor order P >= 0 (gaussian only).
    """

    uses_teacher = True

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if kernel not in CC_KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {CC_KERNEL_CHOICES}, got {kernel!r}.")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}. Use e.g. gamma: 0.4.")
        if not (isinstance(order, int) and order >= 0):
            raise ValueError(f"order must be an int >= 0, got {order!r}. Use e.g. order: 2.")
        self.kernel = kernel
        self.gamma = float(gamma)
        self.order = order

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return correlation_congruence(student, teacher, self.kernel, self.gamma, self.order)


@records_init_args
class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

    Each sample's distribution over its batch neighbours, from the cosine-similarity kernel
    ``(cos + 1) / 2``, is matched with ``KL(teacher || student)``.

    Two forms (equations in :func:`kd_lightning.functional.probabilistic_knowledge_transfer`):

    - ``"paper"`` (default): the paper's definition, a sample is not its own neighbour, the KL
      summed over neighbours and averaged over the batch.
    - ``"authors_code"``: the authors' released code, which keeps each sample's similarity with
      itself, smooths the log ratio with ``eps`` and divides the sum by ``B^2``. Choose it to
      reuse a weight tuned on that code (e.g. 30000 in CRD's benchmark); with the paper form
      such a weight is roughly B times too large.

    Args:
        eps: ``"paper"``: floor of the student probability inside the logarithm;
            ``"authors_code"``: the smoothing constant (authors: 1e-7).
        form: ``"paper"`` or ``"authors_code"``.
    """

    uses_teacher = True

    def __init__(self, eps: float = 1e-7, form: str = "paper") -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}. Use e.g. eps: 1.0e-7.")
        if form not in PKT_FORMS:
            raise ValueError(
                f"form must be one of {PKT_FORMS}, got {form!r}: 'paper' for the paper's "
                "equation, 'authors_code' to match weights tuned on the authors' code."
            )
        self.eps = float(eps)
        self.form = form

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return probabilistic_knowledge_transfer(student, teacher, self.eps, self.form)
