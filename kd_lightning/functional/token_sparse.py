r"""Token-level distillation from a sparse (top-k) teacher: the stateless core of
:class:`kd_lightning.losses.SparseTokenDistillationLoss`.

A per-token teacher cache (:class:`~kd_lightning.data.TeacherCache` with ``granularity:
token``) keeps, for every token, the teacher's k largest log-probabilities at temperature T,
:math:`\ell_i = \log p_i` with :math:`p = \mathrm{softmax}(v / T)` over the *whole* vocabulary,
and their vocabulary indices S (:func:`~kd_lightning.functional.sparse_soft_target.topk_log_probs`).
The rest of the teacher's mass, :math:`p_{rest} = 1 - \sum_{i \in S} p_i`, is known as a total
only.

**Tail handling: the rest is one bucket** (``tail = "rest_mass"`` in the cache header). Both
distributions are coarsened onto the partition :math:`\{\{i\} : i \in S\} \cup \{\bar S\}`,

.. math::
    \tilde p = (p_{i_1}, \dots, p_{i_k}, p_{rest}), \qquad
    \tilde q = (q_{i_1}, \dots, q_{i_k}, q_{rest}), \quad
    q = \mathrm{softmax}(z / T),\ q_{rest} = \sum_{j \notin S} q_j,

and the divergence of :mod:`kd_lightning.functional.token` (forward KL, reverse KL, GKD's
generalized JSD, total variation) is taken between :math:`\tilde p` and :math:`\tilde q`, per
token, with the same weights (masking, ``ignore_index``, next-token ``shift``, ``reduction``)
and the same :math:`T^2` factor:

.. math:: \mathcal{L} = T^2 \sum_{b,t} w_{b,t}\, D(\tilde p_{b,t}, \tilde q_{b,t}).

Why the bucket and not renormalised top-k: renormalising :math:`p` over S assumes the teacher
gives its tail no mass and leaves the student's tail unconstrained; Anshumann et al. (2025,
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL) prove that caching
top-k probabilities this way gives biased estimates of the teacher's distribution and a worse
calibrated student. The bucket keeps the tail's total exact: with k = V it is empty and the
loss *is* the dense token loss; for k < V, as all four divergences are f-divergences, the
coarsened value never exceeds the dense one (data-processing inequality; finite teacher
logits), and it is zero exactly when the student matches every kept probability and the
tail's total. DistillKit (Arcee AI) offers both choices for its sparse KL
(``missing_probability_handling``: ``zero``, the default, or ``symmetric_uniform``, whose KL
adds the same :math:`p_{rest} \log (p_{rest} / q_{rest})` term as the bucket here).

Shapes: student logits ``(B, L, V)`` or ``(N, V)``; teacher values and indices ``(B, L, k)`` /
``(N, k)``, k <= V. Dropped tokens (padding, ``ignore_index``, the last position under
``shift``) are selected away before any arithmetic: whatever the cache holds there (padding
rows) changes nothing and their student logits get exactly zero gradient. A ``-inf`` teacher
value (a masked vocabulary entry among the top k) is a probability of 0; an empty bucket
(:math:`p_{rest} = 0`) contributes 0.
"""

from __future__ import annotations

import math

import torch

from kd_lightning.functional._precision import compute_dtype, full_precision
from kd_lightning.functional._shapes import check_topk_pair
from kd_lightning.functional.token import (
    TOKEN_IGNORE_INDEX,
    check_token_options,
    divergence_rows,
    effective_objective,
    flat_token_weights,
    scaled_rows,
    token_log_probs,
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^x)` for :math:`x \le 0`, accurate near 0 and near :math:`-\infty`
    (Mächler 2012): ``log(-expm1(x))`` above :math:`-\log 2`, ``log1p(-exp(x))`` below."""
    return torch.where(x > -math.log(2.0), (-torch.expm1(x)).log(), (-x.exp()).log1p())


def check_topk_knowledge(
    student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, topk: int | None = None
) -> int:
    """The number of cached entries per token, k, after checking shapes against the student.

    Raises:
        ValueError: values and indices of different shapes, token layouts that differ, more
            entries than vocabulary, or a k other than ``topk`` (when given); each naming both
            sides and the fix.
    """
    k = check_topk_pair(
        student,
        values,
        indices,
        "Sparse token loss",
        names="teacher top-k values and indices",
        source="teacher cache (LossTerm teacher: topk).",
        layout="have the same (B, L) / (N,) token layout. A cache of one output per sample "
        "(granularity: sample) cannot teach per-token logits: build the cache with "
        "granularity: token.",
    )
    vocab = student.shape[-1]
    if topk is not None and k != topk:
        raise ValueError(
            f"Sparse token loss: the teacher cache holds the top-{k} entries per token but the "
            f"loss expects topk={topk}: set the loss's topk to {k} (or leave it unset), or "
            f"rebuild the cache with topk: {topk}."
        )
    if k > vocab:
        raise ValueError(
            f"Sparse token loss: the teacher has {k} top-k entries per token but the student's "
            f"vocabulary has only {vocab} entries: build the cache with topk <= {vocab}, or "
            "check that teacher and student share the tokenizer."
        )
    return k


def coarse_log_probs(
    student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(log q~, log p~)`` ``(N, k')``: the coarsened distributions of the module docstring.

    ``student`` are scaled logits :math:`z/T` ``(N, V)``, ``values`` the teacher's
    log-probabilities ``(N, k)`` and ``indices`` their (distinct, ``< V``) vocabulary indices.
    ``k' = k + 1`` (the rest bucket) when k < V, else k (no tail).
    """
    log_normaliser = torch.logsumexp(student, dim=-1, keepdim=True)
    log_q = student.gather(-1, indices) - log_normaliser
    log_p = values
    if indices.shape[-1] < student.shape[-1]:
        off_top = student.scatter(-1, indices, -math.inf)
        log_q_rest = torch.logsumexp(off_top, dim=-1, keepdim=True) - log_normaliser
        # Rounding may put the stored top-k mass at or a hair above 1: the bucket is then empty.
        top_mass = torch.logsumexp(values, dim=-1, keepdim=True).clamp_max(0.0)
        log_q = torch.cat([log_q, log_q_rest], dim=-1)
        log_p = torch.cat([values, log1mexp(top_mass)], dim=-1)
    return log_q, log_p


def sparse_token_divergence(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    objective: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    shift: bool = True,
    reduction: str = "token",
    ignore_index: int = TOKEN_IGNORE_INDEX,
    topk: int | None = None,
) -> torch.Tensor:
    r""":math:`T^2 \sum_{b,t} w_{b,t} D(\tilde p_{b,t}, \tilde q_{b,t})` from a top-k teacher.

    Args:
        student: student logits ``(B, L, V)`` or ``(N, V)``.
        teacher_values: the teacher's top-k log-probabilities at ``temperature`` (under the
            full softmax), ``(B, L, k)`` / ``(N, k)``; detached here.
        teacher_indices: their vocabulary indices, the same shape (any integer dtype).
        target, mask, objective, beta, temperature, scale_by_t2, shift, reduction,
            ignore_index: as :func:`~kd_lightning.functional.token.token_divergence` (the same
            token weights and next-token shift). ``temperature`` must be the one the values
            were stored at (the method's start-up check compares it with the cache header).
        topk: the k the caller expects; ``None`` accepts any.

    Returns:
        scalar in float32 (float64 for float64 inputs); equal to ``token_divergence`` on the
        dense teacher logits when k = V.

    Raises:
        ValueError: bad options, shapes or k (see :func:`check_topk_knowledge`), or an index
            outside the student's vocabulary.
    """
    check_token_options(objective, beta, temperature, reduction)
    teacher_values = teacher_values.detach()
    k = check_topk_knowledge(student, teacher_values, teacher_indices, topk)
    vocab = student.shape[-1]
    indices = teacher_indices.reshape(-1, k).long()
    if indices.numel() and int(indices.max()) >= vocab:
        raise ValueError(
            f"Sparse token loss: the teacher cache holds vocabulary index {int(indices.max())} "
            f"but the student's vocabulary has {vocab} entries: the teacher's vocabulary is "
            "larger (padded embeddings or another tokenizer); give the student the teacher's "
            "vocabulary size."
        )
    dtype = compute_dtype(student, teacher_values)
    weights = flat_token_weights(
        student.shape[:-1], target, mask, shift, reduction, ignore_index, student.device, dtype
    )
    with full_precision(student):
        keep = (weights > 0).unsqueeze(-1)
        # Dropped rows become a valid uniform top-k over distinct indices (finite everywhere).
        uniform = torch.full((1, k), -math.log(k), dtype=dtype, device=student.device)
        values = torch.where(keep, teacher_values.reshape(-1, k).to(dtype), uniform)
        indices = torch.where(keep, indices, torch.arange(k, device=indices.device))
        log_q, log_p = coarse_log_probs(
            scaled_rows(student.reshape(-1, vocab), keep, temperature, dtype), values, indices
        )
        objective = effective_objective(objective, beta)
        log_q, log_p = token_log_probs(log_q, log_p, objective)
        loss = (divergence_rows(log_q, log_p, objective, beta) * weights).sum()
    return loss * temperature**2 if scale_by_t2 else loss
