r"""Soft targets from a sparse (top-k) teacher: the stateless core of
:class:`kd_lightning.losses.SparseSoftTargetKLLoss`.

A teacher-output cache for a large output space keeps, per sample, only the k most probable
classes: their log-probabilities at temperature T and their indices (:func:`topk_log_probs`).
The rest of the teacher's mass, :math:`p_{rest} = 1 - \sum_{i \in S} p_i`, is known as a total
but not per class. Renormalising the top-k probabilities (dropping the tail) would leave the
student's tail unconstrained; here the tail is kept as one "rest" bucket instead.

With S the top-k set, :math:`p = \mathrm{softmax}(v / T)` (teacher) and
:math:`q = \mathrm{softmax}(z / T)` (student), the loss is the KL divergence between the two
distributions coarsened onto the partition :math:`\{\{i\} : i \in S\} \cup \{\bar S\}`:

.. math::
    \mathcal{L} = T^2 \cdot \frac{1}{B} \sum_b \Big[ \sum_{i \in S} p_i \log \frac{p_i}{q_i}
        + p_{rest} \log \frac{p_{rest}}{q_{rest}} \Big],
    \qquad q_{rest} = \sum_{j \notin S} q_j .

Why this form:

- k = C (no tail) gives exactly Hinton et al.'s (2015) soft-target KL.
- By the log-sum inequality it never exceeds the full KL, and it is zero exactly when the student
  matches the teacher on every top-k class and on the total tail mass: what the cache knows.
- Its gradient with respect to a student logit is :math:`(q_i - p_i) / T` for :math:`i \in S`
  (as in the dense loss) and :math:`(q_j - p_{rest}\, q_j / q_{rest}) / T` for
  :math:`j \notin S`: the teacher's tail mass is spread over the student's tail classes in
  proportion to the student's own tail probabilities, the least informative assumption about
  how the teacher's tail is shaped.

A ``-inf`` teacher log-probability (a masked class that made it into the top k) is a
probability of 0 and contributes 0, as does an empty rest bucket.
"""

from __future__ import annotations

import torch

from kd_lightning.functional._divergence import kl_from_log_probs, softened_log_probs
from kd_lightning.functional._precision import upcast


def topk_log_probs(
    teacher: torch.Tensor, k: int, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse teacher knowledge: the ``k`` largest ``log_softmax(v / T)`` values and their class indices.

    Args:
        teacher: teacher logits, shape ``(B, C)`` or ``(B, L, V)``.
        k: classes kept per row (clipped to C).
        temperature: temperature T of the stored log-probabilities.

    Returns:
        ``(values, indices)``, each ``(..., min(k, C))``, sorted by decreasing probability;
        values in float32 (float64 for float64 logits).
    """
    log_p = softened_log_probs(teacher.detach(), temperature)
    return log_p.topk(min(k, log_p.shape[-1]), dim=-1)


def sparse_soft_target_kl(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 4.0,
    scale_by_t2: bool = True,
) -> torch.Tensor:
    r"""KL over the teacher's top-k classes plus one bucket for the rest (module docstring).

    Args:
        student: student logits, shape ``(B, C)`` or ``(B, L, V)``.
        teacher_values: the teacher's log-probabilities at ``temperature`` of its top-k classes,
            ``(B, k)`` or ``(B, L, k)`` (from :func:`topk_log_probs` or a teacher cache built at
            the same T).
        teacher_indices: the classes of those values, long, the same shape, distinct per row.
        temperature: softening temperature T > 0 (the one the values were computed at).
        scale_by_t2: multiply by T^2 (Hinton et al. 2015).

    Returns:
        scalar: mean over rows, times T^2 (float32, or float64 for float64 inputs).
    """
    if teacher_values.shape != teacher_indices.shape or teacher_values.dim() < 1:
        raise ValueError(
            "Sparse soft-target KL: teacher_values and teacher_indices must have the same shape "
            f"(..., k); got {tuple(teacher_values.shape)} and {tuple(teacher_indices.shape)}. "
            "Pass the (values, indices) pair of one top-k cache entry."
        )
    if student.shape[:-1] != teacher_values.shape[:-1]:
        raise ValueError(
            f"Sparse soft-target KL: student logits {tuple(student.shape)} and teacher top-k "
            f"values {tuple(teacher_values.shape)} must share every dimension but the last "
            "(student (..., C) against teacher (..., k)). Squeeze or reshape the side with the "
            "extra dimension, or rebuild the cache for this data."
        )
    num_classes, k = student.shape[-1], teacher_values.shape[-1]
    if k > num_classes:
        raise ValueError(
            f"Sparse soft-target KL: the teacher has {k} top-k entries but the student only "
            f"{num_classes} classes. Build the cache with topk <= {num_classes}, or check that "
            "teacher and student share the class set."
        )
    scaled = upcast(student) / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    indices = teacher_indices.long()
    log_q_top = scaled.gather(-1, indices) - log_normaliser
    log_p_top = upcast(teacher_values.detach())
    kl = kl_from_log_probs(log_p_top, log_q_top)
    if k < num_classes:
        # The rest bucket: the teacher's remaining mass against the student's mass off S.
        p_rest = (1.0 - log_p_top.exp().sum(dim=-1, keepdim=True)).clamp_min(0.0)
        off_top = scaled.scatter(-1, indices, float("-inf"))
        log_q_rest = torch.logsumexp(off_top, dim=-1, keepdim=True) - log_normaliser
        kl = kl + kl_from_log_probs(p_rest.log(), log_q_rest)
    kl = kl.mean()
    return kl * temperature**2 if scale_by_t2 else kl
