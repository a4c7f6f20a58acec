"""Response-based knowledge: soft targets, hard labels, logit matching (stateless functions).

These are the private cores that the loss modules in :mod:`kd_lightning.losses.soft_target`
wrap. Softmax and log-softmax run in float32 for float16/bfloat16 inputs, whatever the autocast
dtype (at temperature T the logits are divided by T and small probabilities matter to the KL);
float64 inputs stay float64. A teacher logit of ``-inf`` is a probability of 0, never a NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.functional._divergence import kl_from_log_probs, softened_log_probs
from kd_lightning.functional._precision import upcast
from kd_lightning.functional._shapes import check_same_shape

IGNORE_INDEX = -1
"""Target value of a transfer-set sample that carries no label."""


def soft_target_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, scale_by_t2: bool = True
) -> torch.Tensor:
    r"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    .. math::
        \mathcal{L}_{KD} = T^2 \cdot \frac{1}{N} \sum_n \mathrm{KL}\big(p^{(n)} \,\|\, q^{(n)}\big),
        \quad p = \mathrm{softmax}(v / T),\ q = \mathrm{softmax}(z / T)

    with teacher logits ``v`` and student logits ``z``, over the N rows (samples, or tokens of
    ``(B, L, V)`` logits). The gradient of the KL with respect to a student logit is
    :math:`(q_i - p_i) / T`; the :math:`T^2` factor keeps the soft-target gradient magnitude
    independent of T (Hinton et al. 2015, section 2).

    A teacher logit of ``-inf`` (a masked class) is :math:`p_i = 0` and its term
    :math:`0 \log(0 / q_i)` is 0: the student is pulled away from that class only through the
    normalisation of ``q``.

    Args:
        student: student logits, shape ``(B, C)`` or ``(B, L, V)``.
        teacher: teacher logits, the same shape (else ``ValueError``).
        temperature: softening temperature T > 0.
        scale_by_t2: multiply by T^2 as the paper prescribes.

    Returns:
        scalar: mean over rows of KL(teacher || student), times T^2; float32, or float64 for
        float64 inputs.
    """
    check_same_shape(student, teacher, "Soft-target KL")
    kl = soft_target_kl_rows(student, teacher.detach(), temperature).mean()
    return kl * temperature**2 if scale_by_t2 else kl


def soft_target_kl_rows(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""Per-row :math:`\mathrm{KL}(p \| q)`, ``(B,)`` or ``(B, L)``, accurate at high T and >= 0.

    At a high temperature both softened distributions are close to uniform: every
    :math:`\log p_i` and :math:`\log q_i` is about :math:`-\log C` while their difference is
    about :math:`d/T`, so :math:`\sum p_i(\log p_i - \log q_i)` cancels to its rounding error
    (float32, T=1e6: -1e-7 instead of +1e-10, times :math:`T^2` a large negative "KL"). Rows
    whose scaled logit differences :math:`d_i = (v_i - z_i)/T` are all within ``[-1, 1]``
    therefore use the exact rewriting

    .. math:: \mathrm{KL}(p\|q) = \sum_i p_i d_i - \log\Big(1 + \sum_i q_i\,(e^{d_i} - 1)\Big)

    (since :math:`\log p_i - \log q_i = d_i - \log \sum_j q_j e^{d_j}`), whose terms are of
    the size of :math:`d` and keep a relative accuracy near machine precision; other rows use
    :math:`\sum p_i(\log p_i - \log q_i)`. A KL is non-negative by definition: what rounding
    leaves below 0 is set to 0. A teacher logit of ``-inf`` is :math:`p_i = 0`
    (:math:`e^{d_i} = 0`, no :math:`p_i d_i` term); a student ``-inf`` where the teacher has
    mass gives :math:`+\infty`.
    """
    z, v = upcast(student), upcast(teacher)
    log_q, log_p = softened_log_probs(z, temperature), softened_log_probs(v, temperature)
    classic = kl_from_log_probs(log_p, log_q)
    p, q = log_p.exp(), log_q.exp()
    outside = (p == 0) | (q == 0)
    d = torch.where(outside, torch.zeros_like(z), (v - z) / temperature).clamp(-1.0, 1.0)
    e = torch.where(p == 0, torch.full_like(d, -1.0), torch.expm1(d))
    close = ((v - z).abs() / temperature <= 1.0) | outside
    rewritten = (p * d).sum(-1) - torch.log1p((q * e).sum(-1))
    rewritten = torch.where(((q == 0) & (p > 0)).any(-1), classic, rewritten)
    return torch.where(close.all(-1), rewritten, classic).clamp_min(0.0)


def hard_label_cross_entropy(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Cross-entropy with the ground-truth labels, ignoring unlabeled samples (``target == -1``).

    .. math:: \mathcal{L}_{CE} = -\frac{1}{|L|} \sum_{b \in L} \log \mathrm{softmax}(z^{(b)})_{y_b}

    over the labeled samples L of the batch. A batch with no labeled sample gives 0 (with a
    gradient path), never NaN, so unlabeled-only batches of a transfer set stay harmless.
    Computed in float32 for low-precision logits, float64 for float64.
    """
    logits = upcast(student)
    labeled = target != IGNORE_INDEX
    per_sample = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    # Sum / count without a host sync: no data-dependent indexing.
    count = labeled.sum().clamp_min(1)
    return (per_sample * labeled).sum() / count


def logit_matching_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?": regress the logits.

    The paper's objective (their section 2.3) over N training rows is

    .. math:: \mathcal{L} = \frac{1}{2N} \sum_n \lVert z^{(n)} - v^{(n)} \rVert_2^2

    i.e. half the squared error *summed* over the C classes, averaged over rows: C/2 times the
    element-wise ``mean((z - v)^2)``. This is computed as written. The 1/2 makes the gradient
    exactly :math:`(z_i - v_i)/N`, which is C times the high-temperature limit of the
    (T^2-scaled) soft-target gradient for zero-mean logits (Hinton et al. 2015, section 2.1).

    A teacher logit of ``-inf`` marks a class that is not part of the output (a masked or padded
    vocabulary entry): there is no logit to regress, so that entry contributes nothing to the
    sum and the student's logit there gets no gradient.

    Args:
        student: student logits ``(B, C)`` or ``(B, L, V)``.
        teacher: teacher logits, the same shape.

    Returns:
        scalar (float32, or float64 for float64 inputs).
    """
    check_same_shape(student, teacher, "Logit matching")
    v = upcast(teacher.detach())
    masked = v == float("-inf")
    diff = upcast(student) - torch.where(masked, torch.zeros_like(v), v)
    squared = torch.where(masked, torch.zeros_like(diff), diff.pow(2))
    return 0.5 * squared.sum(dim=-1).mean()
