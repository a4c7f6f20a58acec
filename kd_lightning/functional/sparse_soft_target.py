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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_log_probs(
    teacher: torch.Tensor, k: int, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse teacher knowledge: the ``k`` largest ``log_softmax(v / T)`` values and their class indices.

    Args:
        teacher: teacher logits, shape ``(B, C)``.
        k: classes kept per sample (clipped to C).
        temperature: temperature T of the stored log-probabilities.

    Returns:
        ``(values, indices)``, each ``(B, min(k, C))``, sorted by decreasing probability.
    """
    log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
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
        student: student logits, shape ``(B, C)``.
        teacher_values: the teacher's log-probabilities at ``temperature`` of its top-k classes,
            ``(B, k)`` (from :func:`topk_log_probs` or a teacher cache built at the same T).
        teacher_indices: the classes of those values, long ``(B, k)``, distinct per row.
        temperature: softening temperature T > 0 (the one the values were computed at).
        scale_by_t2: multiply by T^2 (Hinton et al. 2015).

    Returns:
        scalar: batch mean, times T^2.
    """
    if teacher_values.shape != teacher_indices.shape or teacher_values.dim() != 2:
        raise ValueError(
            "teacher_values and teacher_indices must both be (B, k); got "
            f"{tuple(teacher_values.shape)} and {tuple(teacher_indices.shape)}"
        )
    num_classes, k = student.shape[-1], teacher_values.shape[-1]
    if k > num_classes:
        raise ValueError(
            f"the teacher has {k} top-k entries but the student only {num_classes} classes"
        )
    scaled = student.float() / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    indices = teacher_indices.long()
    log_q_top = scaled.gather(-1, indices) - log_normaliser[:, None]
    log_p_top = teacher_values.detach().float()
    p_top = log_p_top.exp()
    kl = (p_top * (log_p_top - log_q_top)).sum(dim=-1)
    if k < num_classes:
        # The rest bucket: the teacher's remaining mass against the student's mass off S.
        p_rest = (1.0 - p_top.sum(dim=-1)).clamp_min(0.0)
        off_top = scaled.scatter(-1, indices, float("-inf"))
        log_q_rest = torch.logsumexp(off_top, dim=-1) - log_normaliser
        kl = kl + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    kl = kl.mean()
    return kl * temperature**2 if scale_by_t2 else kl
