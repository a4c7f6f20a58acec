"""Response-based knowledge beyond Hinton's KL: DKD, logit standardization, DIST.

Stateless cores of :mod:`kd_lightning.losses.response`.

- Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".
- Sun, Ren, Li, Wang & Cao (CVPR 2024), "Logit Standardization in Knowledge Distillation".
- Huang, You, Wang, Qian & Xu (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

Every softmax, log-softmax and standardisation runs in float32, whatever the autocast dtype.
Teacher tensors are detached: gradients reach the student only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.functional.soft_target import IGNORE_INDEX

DKD_UNLABELED_CHOICES = ("ignore", "teacher_argmax")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{name} expects student and teacher logits of the same shape (B, C); got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )


def _dkd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    unlabeled: str = "ignore",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD (without T^2), and the per-sample weight of labeled samples.

    Returns ``(tckd, nckd, keep)``, each of shape ``(B,)``; ``keep`` is 1.0 for samples that
    enter the mean and 0.0 for unlabeled samples that are ignored.
    """
    _check_logits(student, teacher, "DKD")
    if unlabeled not in DKD_UNLABELED_CHOICES:
        raise ValueError(f"unlabeled must be one of {DKD_UNLABELED_CHOICES}, got {unlabeled!r}.")
    if student.shape[-1] < 2:
        raise ValueError("DKD needs at least 2 classes: NCKD is a distribution over C - 1 classes.")
    z = student.float() / temperature
    v = teacher.detach().float() / temperature

    labeled = target != IGNORE_INDEX
    if unlabeled == "teacher_argmax":
        # The teacher's prediction stands in for the missing label.
        target = torch.where(labeled, target, v.argmax(dim=-1))
        keep = torch.ones_like(z[:, 0])
    else:
        target = target.clamp_min(0)
        keep = labeled.float()
    gt = F.one_hot(target, z.shape[-1]).bool()

    # Target-class KD on the binary distribution b = [p_t, 1 - p_t], in log space:
    # log(1 - p_t) = logsumexp over non-target logits - logsumexp over all logits.
    def log_binary(logits: torch.Tensor) -> torch.Tensor:
        lse_all = logits.logsumexp(dim=-1)
        log_pt = (logits * gt).sum(dim=-1) - lse_all
        log_rest = logits.masked_fill(gt, float("-inf")).logsumexp(dim=-1) - lse_all
        return torch.stack([log_pt, log_rest], dim=-1)

    log_b_s, log_b_t = log_binary(z), log_binary(v)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=-1)

    # Non-target KD: softmax over the C - 1 non-target classes. The target entry is -inf
    # before the softmax and then replaced by 0 so that 0 * (0 - 0) contributes nothing (and
    # no inf - inf reaches the backward pass).
    def log_nontarget(logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.masked_fill(gt, float("-inf")), dim=-1).masked_fill(gt, 0.0)

    log_nt_s, log_nt_t = log_nontarget(z), log_nontarget(v)
    p_nt_t = log_nt_t.exp().masked_fill(gt, 0.0)
    nckd = (p_nt_t * (log_nt_t - log_nt_s)).sum(dim=-1)
    return tckd, nckd, keep


def decoupled_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    unlabeled: str = "ignore",
) -> torch.Tensor:
    r"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    The paper rewrites Hinton's KD (their Eq. 7) as

    .. math::
        \mathrm{KD} = \underbrace{\mathrm{KL}(b^{T} \| b^{S})}_{\mathrm{TCKD}}
        + (1 - p_t^{T}) \underbrace{\mathrm{KL}(\hat p^{T} \| \hat p^{S})}_{\mathrm{NCKD}}

    with :math:`b = [p_t, 1 - p_t]` the binary target / non-target probabilities and
    :math:`\hat p_i = p_i / (1 - p_t)` (:math:`i \ne t`) the distribution among the non-target
    classes, all at temperature T. DKD drops the coupling weight :math:`1 - p_t^T`:

    .. math::
        \mathcal{L}_{DKD} = T^2 \cdot \frac{1}{|L|} \sum_{b \in L}
        \big(\alpha \, \mathrm{TCKD}_b + \beta \, \mathrm{NCKD}_b\big)

    DKD needs the label ``t`` of each sample. With ``unlabeled="ignore"`` (default) samples with
    ``target == -1`` are left out of the mean (L = the labeled samples; an all-unlabeled batch
    gives 0 with a gradient path, never NaN). With ``unlabeled="teacher_argmax"`` the teacher's
    top-1 class replaces a missing label and every sample counts.

    Args:
        student: student logits ``(B, C)``, C >= 2.
        teacher: teacher logits ``(B, C)``.
        target: labels ``(B,)`` (long), ``-1`` where unlabeled.
        alpha: weight of TCKD (paper: 1.0).
        beta: weight of NCKD (paper: 8.0 on CIFAR-100, 0.5 on ImageNet).
        temperature: softmax temperature T (paper: 4 on CIFAR-100, 1 on ImageNet).
        unlabeled: ``"ignore"`` or ``"teacher_argmax"``, see above.

    Returns:
        scalar loss (float32).
    """
    tckd, nckd, keep = _dkd_terms(student, teacher, target, temperature, unlabeled)
    per_sample = alpha * tckd + beta * nckd
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0) * temperature**2


def _zscore(logits: torch.Tensor, eps: float) -> torch.Tensor:
    mean = logits.mean(dim=-1, keepdim=True)
    std = (logits - mean).pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (logits - mean) / (std + eps)


def logit_standardization_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 2.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    r"""KD on Z-score standardised logits (Sun et al., CVPR 2024).

    .. math::
        \mathcal{Z}(z; \tau) = \frac{z - \bar z}{\tau\, \sigma(z)},\quad
        \sigma(z) = \Big(\frac{1}{C}\sum_k (z_k - \bar z)^2\Big)^{1/2}

    per sample, for teacher and student alike, then

    .. math::
        \mathcal{L} = \tau^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(
        \mathrm{softmax}(\mathcal{Z}(v^{(b)};\tau)) \,\|\, \mathrm{softmax}(\mathcal{Z}(z^{(b)};\tau))\big)

    The effective temperature of each sample is :math:`\tau\sigma`, so the student only has to
    match the teacher's logit *relations*, not their range. ``sigma`` is the population standard
    deviation (1/C), as in the paper's definition; ``eps`` guards constant logits.

    Args:
        student: student logits ``(B, C)``.
        teacher: teacher logits ``(B, C)``.
        temperature: base temperature :math:`\tau` > 0.
        eps: added to the standard deviation.

    Returns:
        scalar loss (float32).
    """
    _check_logits(student, teacher, "Logit standardization KD")
    z = _zscore(student.float(), eps) / temperature
    v = _zscore(teacher.detach().float(), eps) / temperature
    log_q = F.log_softmax(z, dim=-1)
    log_p = F.log_softmax(v, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean() * temperature**2


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """``1 - Pearson correlation`` of ``a`` and ``b`` along ``dim``."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return 1.0 - F.cosine_similarity(a, b, dim=dim, eps=eps)


def dist_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""DIST: relation matching of predictions (Huang et al., NeurIPS 2022).

    With :math:`Y^{s} = \mathrm{softmax}(Z^{s}/\tau)` and :math:`Y^{t}` likewise (``B x C``)
    and :math:`d_p(u, v) = 1 - \rho_{\mathrm{Pearson}}(u, v)`:

    .. math::
        \mathcal{L}_{inter} = \frac{1}{B}\sum_{i=1}^{B} d_p(Y^{s}_{i,:}, Y^{t}_{i,:}),\qquad
        \mathcal{L}_{intra} = \frac{1}{C}\sum_{j=1}^{C} d_p(Y^{s}_{:,j}, Y^{t}_{:,j})

    .. math:: \mathcal{L}_{DIST} = \tau^2 (\beta\, \mathcal{L}_{inter} + \gamma\, \mathcal{L}_{intra})

    Inter-class relations compare each sample's class ranking, intra-class relations compare
    how each class's probability varies across the batch (needs B >= 2).

    Args:
        student: student logits ``(B, C)``.
        teacher: teacher logits ``(B, C)``.
        beta: weight of the inter-class term (paper: 1).
        gamma: weight of the intra-class term (paper: 1).
        temperature: softmax temperature :math:`\tau` (paper: 1).
        eps: guards the cosine of constant vectors.

    Returns:
        scalar loss (float32).
    """
    _check_logits(student, teacher, "DIST")
    y_s = F.softmax(student.float() / temperature, dim=-1)
    y_t = F.softmax(teacher.detach().float() / temperature, dim=-1)
    inter = _pearson_distance(y_s, y_t, dim=1, eps=eps).mean()
    intra = _pearson_distance(y_s, y_t, dim=0, eps=eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)
