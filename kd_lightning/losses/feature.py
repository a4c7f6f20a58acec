"""Feature-based loss modules: FitNets, attention transfer, NST, FSP, VID.

Papers: Romero et al. (ICLR 2015), Zagoruyko & Komodakis (ICLR 2017), Huang & Wang (2017),
Yim et al. (CVPR 2017), Ahn et al. (CVPR 2019). Equations are in the functional twins
(:mod:`kd_lightning.functional.feature`).

Contract of :mod:`kd_lightning.losses`: ``forward(*, student, teacher, target=None)``,
keyword-only, student first, returning a float32 scalar (float64 for float64 inputs). The
features arrive as captured by :mod:`kd_lightning.features` and, where the loss needs equal
shapes, already passed through a connector. Only :class:`VIDLoss` owns trainable parameters (its regressor and variances are
part of the paper's objective), so the method must hand its parameters to the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.functional._precision import upcast
from kd_lightning.functional.feature import (
    attention_transfer,
    fitnets_hint,
    flow_of_solution_procedure,
    neuron_selectivity_transfer,
    variational_information,
)
from kd_lightning.models.spec import records_init_args


@records_init_args
class FitNetsHintLoss(nn.Module):
    """FitNets hint loss: mean squared error between the connected student feature and the teacher hint.

    Romero et al. (ICLR 2015). The paper's regressor is a connector from
    :mod:`kd_lightning.features` applied before this loss; shapes must then be equal.
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return fitnets_hint(student, teacher)


@records_init_args
class AttentionTransferLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between L2-normalised attention maps.

    The attention map is the channel mean of ``|A|^p``, flattened and L2-normalised; the loss is
    the mean squared difference of the student's and teacher's maps. The paper's
    ``beta = 1000`` belongs in the term weight. Transformer attention ``(B, heads, N, N)``
    works as is (heads are averaged like channels); token features ``(B, N, D)`` need
    ``channel_dim=-1``.

    Args:
        p: exponent of the activation magnitude (paper: 2).
        channel_dim: dimension reduced into the map (1 for ``(B, C, H, W)``).
    """

    uses_teacher = True

    def __init__(self, p: float = 2.0, channel_dim: int = 1) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}. The paper uses p: 2.")
        if channel_dim == 0:
            raise ValueError(
                "channel_dim must not be 0 (the batch dimension). Use channel_dim: 1 for "
                "(B, C, H, W) features or (B, heads, N, N) attention, -1 for (B, N, D) tokens."
            )
        self.p = float(p)
        self.channel_dim = int(channel_dim)

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return attention_transfer(student, teacher, self.p, self.channel_dim)


@records_init_args
class NSTLoss(nn.Module):
    """Neuron selectivity transfer (Huang & Wang, 2017): squared MMD with the kernel ``(x.y)^2``.

    Each channel's L2-normalised spatial map is one sample; the loss matches the distributions
    of the student's and teacher's channels. Channel counts may differ; spatial sizes may not.
    """

    uses_teacher = True

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return neuron_selectivity_transfer(student, teacher)


@records_init_args
class FSPLoss(nn.Module):
    """Flow of Solution Procedure matrices (Yim et al., CVPR 2017), one pair of layers.

    ``student`` and ``teacher`` are each a pair ``(first_layer, second_layer)`` of feature maps
    ``(B, C, H, W)``; inside a pair the spatial sizes must match. The loss is the batch mean of
    ``||G_T - G_S||_F^2`` with ``G = F1^T F2 / (h w)``. Use one loss term per layer pair.
    """

    uses_teacher = True

    def forward(
        self,
        *,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return flow_of_solution_procedure(student, teacher)


@records_init_args
class VIDLoss(nn.Module):
    """Variational information distillation (Ahn et al., CVPR 2019).

    Learns a heteroscedastic Gaussian ``q(t | s) = N(mu(s), diag(sigma^2))``: the mean ``mu`` is
    a stack of 1x1 convolutions on the student feature (conv-ReLU-conv-ReLU-conv), the variance
    one value per teacher channel, ``sigma_c^2 = softplus(alpha_c) + eps``. The loss is the
    mean of ``log sigma + (t - mu)^2 / (2 sigma^2)``. It has trainable parameters: the method
    must optimise them with the student.

    Accepts feature maps ``(B, C, H, W)`` (student and teacher with equal H, W) or vectors
    ``(B, C)``.

    Args:
        student_channels: channels of the student feature.
        teacher_channels: channels of the teacher feature.
        hidden_channels: width of the regressor's hidden 1x1 convolutions (default: the
            teacher's channels).
        init_variance: initial ``sigma^2`` of every channel.
        eps: variance floor.
    """

    uses_teacher = True

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        hidden_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
        ):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(
                    f"{name} must be a positive int, got {value!r}: the channel count (dim 1) "
                    "of the hooked feature."
                )
        hidden = teacher_channels if hidden_channels is None else hidden_channels
        if not (isinstance(hidden, int) and hidden > 0):
            raise ValueError(f"hidden_channels must be a positive int or null, got {hidden!r}.")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}. Use e.g. eps: 1.0e-5.")
        if not init_variance > eps:
            raise ValueError(
                f"init_variance must be > eps ({eps}), got {init_variance}. Use e.g. "
                "init_variance: 5.0."
            )
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.eps = float(eps)
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, teacher_channels, kernel_size=1),
        )
        # softplus(alpha) + eps == init_variance at the start: alpha = softplus^{-1}(v - eps).
        start = init_variance - eps
        self.alpha = nn.Parameter(torch.full((teacher_channels,), math.log(math.expm1(start))))

    def variance(self) -> torch.Tensor:
        """Per-channel variance ``softplus(alpha) + eps``, shape ``(teacher_channels,)``."""
        return F.softplus(upcast(self.alpha)) + self.eps

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student.dim() not in (2, 4) or student.dim() != teacher.dim():
            raise ValueError(
                f"VIDLoss expects (B, C, H, W) or (B, C) features of equal rank; got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        if student.shape[1] != self.student_channels or teacher.shape[1] != self.teacher_channels:
            raise ValueError(
                f"VIDLoss was built for student_channels={self.student_channels}, "
                f"teacher_channels={self.teacher_channels} but got features "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}. Set the channel counts of "
                "the hooked layers."
            )
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"VIDLoss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                "share batch and spatial sizes (the regressor is 1x1). Interpolate/pool the "
                "student feature or hook layers of equal resolution."
            )
        flat = student.dim() == 2
        x = student[:, :, None, None] if flat else student
        mean = self.regressor(x)
        if flat:
            mean = mean[:, :, 0, 0]
        return variational_information(mean, teacher, torch.log(self.variance()))
