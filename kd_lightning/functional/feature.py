"""Feature-based knowledge: hints, attention, neuron selectivity, flow of solution, variational information.

Stateless cores of :mod:`kd_lightning.losses.feature`.

- Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep Nets".
- Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention".
- Huang & Wang (2017), "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".
- Yim, Joo, Bae & Kim (CVPR 2017), "A Gift from Knowledge Distillation: Fast Optimization,
  Network Minimization and Transfer Learning".
- Ahn, Hu, Damianou, Lawrence & Dai (CVPR 2019), "Variational Information Distillation for
  Knowledge Transfer".

Features arrive already connected (a connector from :mod:`kd_lightning.features` maps the
student's shape to the teacher's where a loss needs equal shapes). Shape problems raise a
``ValueError`` that names the fix; they are visible at the first step, not deep in training.
Normalisations run in float32 (float64 for float64 inputs) and teacher tensors are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import full_precision, upcast
from kd_lightning.functional._shapes import check_same_shape


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def fitnets_hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., ICLR 2015).

    .. math:: \mathcal{L}_{HT} = \frac{1}{N} \sum \big(r(u_s) - u_t\big)^2

    the mean squared error between the connected student guided layer :math:`r(u_s)` (``r`` is
    the paper's regressor, here a connector applied by the caller) and the teacher hint
    :math:`u_t`. The paper writes :math:`\tfrac12\lVert u_t - r(u_s)\rVert^2` summed; the mean
    over the N elements only rescales it by the constant 2/N, which a term weight absorbs, and
    keeps the loss scale independent of the feature size.

    Args:
        student: connected student features, any shape ``(B, ...)``.
        teacher: teacher hint, same shape.
    """
    check_same_shape(
        student,
        teacher,
        "FitNets hint",
        what="features",
        layout="(B, ...)",
        fix="Put a connector (kd_lightning.features) on the student feature so that it "
        "produces the teacher's shape.",
    )
    return F.mse_loss(upcast(student), upcast(teacher.detach()))


def _attention_map(feature: torch.Tensor, p: float, channel_dim: int) -> torch.Tensor:
    """``normalize(mean_c |A_c|^p)``, flattened to ``(B, positions)``."""
    amap = upcast(feature).abs().pow(p).mean(dim=channel_dim)
    return F.normalize(amap.flatten(1), dim=1)


def attention_transfer(
    student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, channel_dim: int = 1
) -> torch.Tensor:
    r"""Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    The spatial attention map of an activation tensor :math:`A \in \mathbb{R}^{C\times H\times W}`
    is :math:`F(A) = \frac{1}{C}\sum_c |A_c|^p` (p = 2 in the paper), vectorised to
    :math:`Q`. The loss compares L2-normalised maps:

    .. math::
        \mathcal{L}_{AT} = \frac{1}{B \cdot HW} \sum_b \Big\lVert
        \frac{Q_s^{(b)}}{\lVert Q_s^{(b)} \rVert_2} - \frac{Q_t^{(b)}}{\lVert Q_t^{(b)} \rVert_2}
        \Big\rVert_2^2

    Eq. 2 of the paper writes :math:`\tfrac{\beta}{2}\lVert\cdot\rVert_p`; the authors'
    training uses the squared difference averaged over the batch and the map (their
    :math:`\beta = 10^3` "divided by the number of elements in the attention map and batch
    size"), which is what is computed here; put :math:`\beta` in the term weight (1000 in the
    paper). Mean or sum over channels gives the same normalised map.

    Shapes: ``channel_dim`` (default 1) is reduced, every other non-batch dimension is a
    position. Convolutional features ``(B, C, H, W)`` use the default. Transformer attention
    probabilities ``(B, heads, N, N)`` also use the default: heads play the role of channels,
    so the map is the head-averaged ``|attn|^p`` over all N x N query-key pairs. Token features
    ``(B, N, D)`` need ``channel_dim=-1`` (the map is then one value per token). Student and
    teacher may have different channel counts but must have the same positions.

    Args:
        student: student activations.
        teacher: teacher activations.
        p: exponent of the activation magnitude (paper: 2).
        channel_dim: dimension averaged away.
    """
    q_s = _attention_map(student, p, channel_dim)
    q_t = _attention_map(teacher.detach(), p, channel_dim)
    if q_s.shape != q_t.shape:
        raise ValueError(
            f"Attention transfer: the attention maps of student {_shape(student)} and teacher "
            f"{_shape(teacher)} (channel_dim={channel_dim}) have different sizes "
            f"{_shape(q_s)} vs {_shape(q_t)}. Hook layers with the same spatial size, or "
            "interpolate/pool the student feature to the teacher's spatial size."
        )
    return (q_s - q_t).pow(2).mean()


def _selectivity(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, HW)`` with each channel's spatial map L2-normalised."""
    return F.normalize(upcast(feature).flatten(2), dim=2)


def neuron_selectivity_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Neuron selectivity transfer (Huang & Wang, 2017): MMD with a polynomial kernel.

    Each channel's response over the H x W positions is a sample :math:`f^{k} \in
    \mathbb{R}^{HW}`, L2-normalised. With :math:`k(x, y) = (x^\top y + c)^d`, d = 2, c = 0 (the
    paper's best kernel):

    .. math::
        \mathcal{L}_{MMD^2} = \frac{1}{C_T^2}\sum_{i,i'} k(f_T^{i}, f_T^{i'})
        + \frac{1}{C_S^2}\sum_{j,j'} k(f_S^{j}, f_S^{j'})
        - \frac{2}{C_T C_S}\sum_{i,j} k(f_T^{i}, f_S^{j})

    per sample, averaged over the batch. The paper weighs it by :math:`\lambda/2`; that goes in
    the term weight.

    Shapes: ``(B, C_s, H, W)`` and ``(B, C_t, H, W)``: channel counts may differ, positions
    must match.
    """
    if student.dim() < 3 or teacher.dim() < 3:
        raise ValueError(
            f"NST expects feature maps (B, C, H, W); got {_shape(student)} and {_shape(teacher)}."
        )
    f_s = _selectivity(student)
    f_t = _selectivity(teacher.detach())
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[2] != f_t.shape[2]:
        raise ValueError(
            f"NST: student {_shape(student)} and teacher {_shape(teacher)} need the same batch "
            "size and spatial size. Interpolate/pool the student feature to the teacher's "
            "spatial size, or hook layers of equal resolution."
        )
    with full_precision(f_s):
        k_ss = torch.bmm(f_s, f_s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
        k_tt = torch.bmm(f_t, f_t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
        k_st = torch.bmm(f_t, f_s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    return (k_tt + k_ss - 2.0 * k_st).mean()


def _fsp_matrix(first: torch.Tensor, second: torch.Tensor, who: str) -> torch.Tensor:
    if first.dim() != 4 or second.dim() != 4:
        raise ValueError(
            f"FSP: {who} features must be two maps (B, C, H, W); got {_shape(first)} and "
            f"{_shape(second)}."
        )
    if first.shape[0] != second.shape[0] or first.shape[2:] != second.shape[2:]:
        raise ValueError(
            f"FSP: the two {who} feature maps {_shape(first)} and {_shape(second)} must share "
            "batch and spatial size (H, W). Hook two layers of the same resolution, or pool "
            "the larger map (the paper pairs layers within one stage)."
        )
    f1 = upcast(first).flatten(2)
    f2 = upcast(second).flatten(2)
    with full_precision(f1):
        return torch.bmm(f1, f2.transpose(1, 2)) / f1.shape[2]


def flow_of_solution_procedure(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> torch.Tensor:
    r"""Flow of Solution Procedure (FSP) matrix matching (Yim et al., CVPR 2017).

    For two feature maps :math:`F^1 \in \mathbb{R}^{h\times w\times m}` and
    :math:`F^2 \in \mathbb{R}^{h\times w\times n}` of one network,

    .. math:: G_{i,j} = \frac{1}{h w}\sum_{s=1}^{h}\sum_{t=1}^{w} F^1_{s,t,i}\, F^2_{s,t,j}

    and the loss is the squared Frobenius distance of the teacher's and student's matrices,
    averaged over the batch:

    .. math:: \mathcal{L}_{FSP} = \frac{1}{B}\sum_b \lVert G_T^{(b)} - G_S^{(b)} \rVert_F^2

    (one pair of layers; the paper's :math:`\lambda_i` and sum over pairs are term weights and
    several terms).

    Args:
        student: pair ``(F1, F2)`` of student maps ``(B, m, h, w)``, ``(B, n, h, w)``.
        teacher: pair of teacher maps ``(B, m, h', w')``, ``(B, n, h', w')``; the teacher's
            spatial size may differ from the student's, the channel counts may not.
    """
    for who, pair in (("student", student), ("teacher", teacher)):
        if isinstance(pair, torch.Tensor) or len(pair) != 2:
            raise ValueError(
                f"FSP: {who} must be a pair (first_layer, second_layer) of feature maps, got "
                f"{type(pair).__name__}."
            )
    g_s = _fsp_matrix(student[0], student[1], "student")
    g_t = _fsp_matrix(teacher[0].detach(), teacher[1].detach(), "teacher")
    if g_s.shape != g_t.shape:
        raise ValueError(
            f"FSP: student matrix {_shape(g_s)} and teacher matrix {_shape(g_t)} differ: the "
            "channel counts of the paired layers must match. Put connectors on the student "
            "features (kd_lightning.features)."
        )
    return (g_t - g_s).pow(2).sum(dim=(1, 2)).mean()


def variational_information(
    mean: torch.Tensor, teacher: torch.Tensor, log_variance: torch.Tensor
) -> torch.Tensor:
    r"""Variational information distillation (Ahn et al., CVPR 2019): Gaussian negative log-likelihood.

    The teacher feature t is modelled as a Gaussian around a regression :math:`\mu(s)` of the
    student feature, with one learned variance per channel:

    .. math::
        -\log q(t \mid s) = \sum_{c,h,w} \Big[\log \sigma_c
        + \frac{(t_{c,h,w} - \mu_{c,h,w}(s))^2}{2\sigma_c^2}\Big] + \mathrm{const}

    averaged over all elements (batch, channels, positions), the constant dropped.
    Minimising it maximises a variational lower bound on the mutual information I(t; s).

    Args:
        mean: :math:`\mu(s)`, shape ``(B, C_t, ...)``.
        teacher: teacher features, same shape.
        log_variance: :math:`\log\sigma^2_c` per channel, shape ``(C_t,)`` (the module computes
            it from ``softplus(alpha) + eps``).
    """
    check_same_shape(
        mean,
        teacher,
        "VID",
        what="features",
        layout="(B, C_t, ...)",
        fix="The regressed student mean must share batch, channel and spatial sizes with the "
        "teacher feature: hook layers of equal resolution or pool the student feature.",
        min_dim=2,
    )
    if log_variance.shape != (teacher.shape[1],):
        raise ValueError(
            f"VID: one variance per teacher channel expected, got {_shape(log_variance)} for "
            f"teacher {_shape(teacher)}."
        )
    view = (1, -1) + (1,) * (teacher.dim() - 2)
    log_var = upcast(log_variance).view(view)
    diff = upcast(teacher.detach()) - upcast(mean)
    return 0.5 * (log_var + diff.pow(2) * torch.exp(-log_var)).mean()
