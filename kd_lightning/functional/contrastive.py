"""Contrastive knowledge: Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

Stateless core of :class:`kd_lightning.losses.contrastive.CRDLoss`. The module owns the
embedding heads and the memory banks; this file owns the NCE objective given embeddings, memory
banks and the sampled negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import full_precision, upcast


def sample_negatives(index: torch.Tensor, n_data: int, num_negatives: int) -> torch.Tensor:
    """Draw ``num_negatives`` indices per sample uniformly from the *other* ``n_data - 1`` samples.

    A uniform draw over ``n_data - 1`` values shifted by one at and above the sample's own
    index: never the positive, no host sync, on ``index``'s device.

    Returns:
        long tensor ``(B, num_negatives)``.
    """
    draw = torch.randint(0, n_data - 1, (index.shape[0], num_negatives), device=index.device)
    return draw + (draw >= index[:, None]).long()


def _log_scores(
    anchor: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``<memory[contrast_index[b, k]], anchor[b]> / temperature``, shape ``(B, 1 + N)``."""
    critics = upcast(memory[contrast_index])  # (B, 1 + N, D)
    anchor = upcast(anchor)
    dtype = torch.promote_types(critics.dtype, anchor.dtype)
    critics, anchor = critics.to(dtype), anchor.to(dtype)
    with full_precision(critics):
        return torch.bmm(critics, anchor[:, :, None])[:, :, 0] / temperature


def _estimate_log_normalizer(log_scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """``log Z`` with ``Z = M * mean(exp(score / T))``: makes the scores average 1/M, like P_n."""
    flat = log_scores.detach().flatten()
    return flat.logsumexp(dim=0) - math.log(flat.numel()) + math.log(n_data)


def _nce(log_scores: torch.Tensor, log_normalizer: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss of one direction; column 0 of ``log_scores`` is the positive."""
    num_negatives = log_scores.shape[1] - 1
    # log of the noise mass N * P_n = N / M of the uniform noise distribution.
    log_noise = math.log(num_negatives) - math.log(n_data)
    log_p = log_scores - log_normalizer
    # h = P / (P + N/M):  log h = -softplus(log(N/M) - log P),  log(1 - h) = -softplus(log P - log(N/M))
    log_h_pos = -F.softplus(log_noise - log_p[:, 0])
    log_one_minus_h_neg = -F.softplus(log_p[:, 1:] - log_noise)
    return -(log_h_pos + log_one_minus_h_neg.sum(dim=1)).mean()


def _crd_core(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    index: torch.Tensor,
    negative_index: torch.Tensor,
    temperature: float,
    log_normalizer: torch.Tensor | None,
    log_normalizer_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and the ``(log Z_student, log Z_teacher)`` it used.

    ``log_normalizer`` is used where ``log_normalizer_valid`` (a bool tensor, default True) is
    set, otherwise ``log Z`` is estimated from this batch; chosen with ``torch.where``, so a
    module can keep "estimate once" state without a host sync.
    """
    if student_memory.shape != teacher_memory.shape:
        raise ValueError(
            f"CRD memory banks differ: {tuple(student_memory.shape)} vs "
            f"{tuple(teacher_memory.shape)}."
        )
    n_data = student_memory.shape[0]
    contrast_index = torch.cat([index[:, None], negative_index], dim=1)
    # Student anchor against teacher memory, and teacher anchor against student memory.
    scores_s = _log_scores(student_embedding, teacher_memory, contrast_index, temperature)
    scores_t = _log_scores(teacher_embedding, student_memory, contrast_index, temperature)
    log_z = torch.stack(
        [_estimate_log_normalizer(scores_s, n_data), _estimate_log_normalizer(scores_t, n_data)]
    )
    if log_normalizer is not None:
        given = log_normalizer.to(log_z)
        log_z = (
            given
            if log_normalizer_valid is None
            else torch.where(log_normalizer_valid, given, log_z)
        )
    loss = _nce(scores_s, log_z[0], n_data) + _nce(scores_t, log_z[1], n_data)
    return loss, log_z


def crd_nce_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    index: torch.Tensor,
    negative_index: torch.Tensor,
    temperature: float = 0.07,
    log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Contrastive representation distillation loss (Tian et al., ICLR 2020), both directions.

    For embeddings :math:`g_S(s)`, :math:`g_T(t)` (unit vectors), the critic of a pair is

    .. math::
        h(t, s) = \frac{e^{g_T(t)^\top g_S(s)/\tau} / Z}{e^{g_T(t)^\top g_S(s)/\tau} / Z + N/M}

    with M = ``n_data`` (the memory size) and N negatives drawn from the uniform noise
    distribution :math:`P_n = 1/M` (so :math:`N/M` is the noise mass of the NCE), and the loss

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_b \Big[\log h(t_b, s_b)
        + \sum_{k=1}^{N}\log\big(1 - h(t_{j_k}, s_b)\big)\Big]

    computed twice and summed: the student embedding against the teacher memory bank (rows
    ``index`` as the positive, ``negative_index`` as negatives), and the teacher embedding
    against the student memory bank. :math:`Z` is a constant normaliser: the authors estimate it
    once as :math:`M \cdot \mathrm{mean}(e^{\cdot/\tau})` on the first batch; pass the stored
    ``log Z`` values, or ``None`` to estimate them from this batch. The logarithms are evaluated
    as softplus of log-ratios (exact, without the reference implementation's epsilon).

    Args:
        student_embedding: ``(B, D)`` unit-norm student embeddings (trainable).
        teacher_embedding: ``(B, D)`` unit-norm teacher embeddings (a trainable head on a
            detached teacher feature).
        student_memory: ``(M, D)`` memory bank of student embeddings.
        teacher_memory: ``(M, D)`` memory bank of teacher embeddings.
        index: ``(B,)`` long, each sample's row in the memory banks.
        negative_index: ``(B, N)`` long, rows of the negatives (see :func:`sample_negatives`).
        temperature: :math:`\tau` (paper: 0.07).
        log_normalizer: ``(2,)``: :math:`\log Z` of the student-anchored and of the
            teacher-anchored scores, or ``None`` to estimate both from this batch.
    """
    loss, _ = _crd_core(
        student_embedding,
        teacher_embedding,
        student_memory,
        teacher_memory,
        index,
        negative_index,
        temperature,
        log_normalizer,
    )
    return loss
