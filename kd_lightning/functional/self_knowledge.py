"""Self-knowledge: the model's own exits, past predictions and same-class partners (stateless).

Cores of :mod:`kd_lightning.losses.self_knowledge` and of the knowledge that the
self-distillation methods make.

- Zhang, Song, Gao, Chen, Bao & Ma (ICCV 2019), "Be Your Own Teacher: Improve the Performance
  of Convolutional Neural Networks via Self Distillation" (BYOT): :func:`branch_hint`.
- Tarvainen & Valpola (NeurIPS 2017), "Mean teachers are better role models":
  :func:`probability_mse`.
- Kim, Ji, Yoon & Hwang (ICCV 2021), "Self-Knowledge Distillation with Progressive Refinement
  of Targets" (PS-KD): :func:`progressive_self_kd`, :func:`label_logits`.
- Yun, Park, Lee & Shin (CVPR 2020), "Regularizing Class-wise Predictions via Self-knowledge
  Distillation" (CS-KD): :func:`same_class_partners`, :func:`class_partner_logits`,
  :func:`class_wise_kl`.

Softmax runs in float32 under any autocast (float64 stays float64); teacher tensors are
detached, so gradients reach the student side only. Logits are ``(B, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_MARGIN = 1e4
"""Logit gap of :func:`label_logits`: ``exp(-1e4 / T)`` is exactly 0 in float32 for T < 96."""


def _full(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{name} expects student and teacher of the same shape (B, C); got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)`` by global average, ``(B, N, C)`` -> ``(B, C)`` by token mean,
    ``(B, C)`` unchanged, any other shape flattened to ``(B, -1)``."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    return feature.flatten(1)


def branch_hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""BYOT's feature hint: squared L2 distance of a shallow exit's embedding to the deepest feature.

    .. math:: \mathcal{L}_{hint} = \frac{1}{B} \sum_b \lVert g(e_b) - g(f_b) \rVert_2^2

    with :math:`g` = :func:`global_pool` on both sides (so a ``(B, C, H, W)`` deepest map and a
    ``(B, C)`` embedding compare), summed over the C features, mean over the batch. The deepest
    feature :math:`f` is detached (Zhang et al. 2019, eq. 3: the deepest exit teaches).

    Args:
        student: the exit's embedding ``(B, C, ...)``.
        teacher: the deepest feature ``(B, C, ...)``.

    Raises:
        ValueError: the pooled sizes differ (build the heads with the deepest feature's width).
    """
    e, f = _full(global_pool(student)), _full(global_pool(teacher.detach()))
    if e.shape != f.shape:
        raise ValueError(
            f"BYOT hint: the exit embedding pools to {tuple(e.shape)} but the deepest feature to "
            f"{tuple(f.shape)}; build the branch heads with the deepest feature's width "
            "(BranchSelfDistillation's feature_layer does this)"
        )
    return (e - f).pow(2).sum(dim=-1).mean()


def probability_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Mean-teacher consistency: squared distance of the two predicted distributions.

    .. math:: \mathcal{L}_{cons} = \frac{1}{B} \sum_b \lVert \sigma(z_b) - \sigma(v_b) \rVert_2^2

    summed over the C classes, mean over the batch (Tarvainen & Valpola 2017 use this MSE
    between the student's and the EMA teacher's softmax); the teacher ``v`` is detached.

    Args:
        student: student logits ``(B, C)``.
        teacher: teacher (EMA) logits ``(B, C)``.
    """
    _check_pair(student, teacher, "probability MSE")
    p = F.softmax(_full(student), dim=-1)
    q = F.softmax(_full(teacher.detach()), dim=-1)
    return (p - q).pow(2).sum(dim=-1).mean()


def label_logits(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is the one-hot label: 0 at ``target``, ``-LABEL_MARGIN`` elsewhere.

    Rows of unlabeled samples (``target < 0``) are ``like`` (detached) instead. PS-KD's knowledge
    of a sample it has not predicted yet is its label (the authors start from one-hot targets).

    Args:
        target: ``(B,)`` class indices, negative where unlabeled.
        like: ``(B, C)`` logits giving the class count, dtype and device (and unlabeled rows).
    """
    logits = torch.full_like(like, -LABEL_MARGIN, dtype=_full(like).dtype)
    logits.scatter_(1, target.clamp_min(0).unsqueeze(1), 0.0)
    return torch.where((target < 0).unsqueeze(1), _full(like.detach()), logits)


def progressive_soft_targets(
    past: torch.Tensor, target: torch.Tensor, alpha: float
) -> torch.Tensor:
    """PS-KD's targets ``(1 - alpha) * one_hot(y) + alpha * softmax(past)``, shape ``(B, C)``."""
    one_hot = F.one_hot(target.clamp_min(0), past.shape[-1]).to(_full(past).dtype)
    return (1 - alpha) * one_hot + alpha * F.softmax(_full(past.detach()), dim=-1)


def progressive_self_kd(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float
) -> torch.Tensor:
    r"""PS-KD (Kim et al. 2021, eq. 4): cross-entropy with targets softened by the past self.

    .. math:: \mathcal{L} = -\frac{1}{|L|} \sum_{b \in L} \sum_c
        \big[(1 - \alpha_t)\, y_{bc} + \alpha_t\, \sigma(v_b)_c\big] \log \sigma(z_b)_c

    with the one-hot labels :math:`y`, the past logits :math:`v` (detached; their softmax is
    :math:`p_{t-1}`), the student's logits :math:`z`, over the labeled samples L (a batch
    without one gives 0, never NaN).

    Args:
        student: student logits ``(B, C)``.
        teacher: past logits ``(B, C)`` (:func:`label_logits` where there is no past yet).
        target: ``(B,)`` class indices, negative where unlabeled.
        alpha: the mixing weight :math:`\alpha_t` in [0, 1].
    """
    _check_pair(student, teacher, "PS-KD")
    soft = progressive_soft_targets(teacher, target, alpha)
    per_sample = -(soft * F.log_softmax(_full(student), dim=-1)).sum(dim=-1)
    labeled = target >= 0
    return (per_sample * labeled).sum() / labeled.sum().clamp_min(1)


def same_class_partners(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, another labeled sample of its class in the batch: ``(partner, found)``.

    The partner of sample i is the first j after i (cyclically, in batch order) with the same
    label; batches are shuffled, so this is a random pairing. Vectorised over a ``(B, B)``
    matrix, no host synchronisation. Unlabeled samples, and samples alone in their class, have
    none (``found`` False, ``partner`` then points at the sample itself).

    Args:
        target: ``(B,)`` class indices, negative where unlabeled.
    """
    b = target.shape[0]
    positions = torch.arange(b, device=target.device)
    distance = (positions.unsqueeze(0) - positions.unsqueeze(1)) % b  # [i, j] = (j - i) mod B
    labeled = target >= 0
    same = (target.unsqueeze(0) == target.unsqueeze(1)) & labeled.unsqueeze(0)
    same &= labeled.unsqueeze(1) & (distance > 0)
    distance = torch.where(same, distance, b)
    nearest, offset = distance.min(dim=1)
    found = nearest < b
    partner = torch.where(found, offset, positions)
    return partner, found


def class_partner_logits(
    logits: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CS-KD's knowledge: each sample's same-class partner's logits, detached, ``(B, C)``.

    Samples without a partner get their own (detached) logits, so a divergence between the two
    is 0 for them; ``found`` ``(B,)`` says which rows hold a real partner.
    """
    if target is None:
        return logits.detach(), torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    partner, found = same_class_partners(target)
    return logits.detach()[partner], found


def class_wise_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 4.0,
    found: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""CS-KD's class-wise regulariser (Yun et al. 2020, eq. 3), at temperature T.

    .. math:: \mathcal{L}_{cls} = \frac{T^2}{|P|} \sum_{b \in P}
        \mathrm{KL}\big(\sigma(v_b / T) \,\|\, \sigma(z_b / T)\big)

    between each sample's logits :math:`z_b` and its same-class partner's :math:`v_b`
    (detached), averaged over the samples P that have a partner (all rows when ``found`` is
    ``None``; 0, never NaN, when none has one).

    Args:
        student: the samples' logits ``(B, C)``.
        teacher: their partners' logits ``(B, C)``.
        temperature: T > 0 (4 in the paper).
        found: ``(B,)`` bool, which rows have a partner.
    """
    _check_pair(student, teacher, "CS-KD")
    log_q = F.log_softmax(_full(student) / temperature, dim=-1)
    log_p = F.log_softmax(_full(teacher.detach()) / temperature, dim=-1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2
    if found is None:
        return per_sample.mean()
    return (per_sample * found).sum() / found.sum().clamp_min(1)
