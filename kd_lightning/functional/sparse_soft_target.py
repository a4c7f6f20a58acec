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
from kd_lightning.functional._shapes import check_topk_pair


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


def sampled_log_probs(
    teacher: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sparse teacher knowledge by sampling: k draws from the teacher, stored as frequencies.

    Random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", ACL, section 3): draw :math:`x_1, \dots, x_k \sim p =
    \mathrm{softmax}(v / T)` with replacement and keep the empirical distribution
    :math:`\hat p_i = |\{m : x_m = i\}| / k` on the distinct draws. Then
    :math:`\mathbb{E}[\hat p_i] = p_i` for every class, so the cross-entropy
    :math:`-\sum_i \hat p_i \log q_i` and its gradient with respect to the student are
    unbiased estimates of the dense ones: the forward KL from :math:`\hat p` trains the student
    toward the whole teacher distribution, tail included, where top-k (:func:`topk_log_probs`)
    is biased toward the head. The frequencies sum to 1, so a sparse loss's rest bucket is
    empty. (The authors also sample from a tempered proposal with importance weights; we use
    the teacher itself as proposal, the case in which the weights are the plain frequencies.)

    Args:
        teacher: teacher logits ``(..., C)``.
        k: draws per row; the result keeps ``min(k, C)`` entries.
        temperature: T of the distribution sampled from.
        generator: the random stream (a seeded one makes the draws reproducible).

    Returns:
        ``(values, indices)``, each ``(..., min(k, C))``: :math:`\log \hat p` sorted by
        decreasing frequency (``-inf`` for entries not drawn; their indices are distinct
        classes of zero frequency) and the class indices; values in float32 (float64 for
        float64 logits).
    """
    log_p = softened_log_probs(teacher.detach(), temperature)
    flat = log_p.reshape(-1, log_p.shape[-1])
    draws = torch.multinomial(flat.exp(), k, replacement=True, generator=generator)
    counts = torch.zeros_like(flat).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=flat.dtype)
    )
    values, indices = counts.topk(min(k, flat.shape[-1]), dim=-1)
    shape = (*log_p.shape[:-1], values.shape[-1])
    return (values / k).log().reshape(shape), indices.reshape(shape)


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
    k = check_topk_pair(
        student,
        teacher_values,
        teacher_indices,
        "Sparse soft-target KL",
        names="teacher_values and teacher_indices",
        source="cache entry.",
        layout="share every dimension but the last (student (..., C) against teacher (..., k)). "
        "Squeeze or reshape the side with the extra dimension, or rebuild the cache for this "
        "data.",
    )
    num_classes = student.shape[-1]
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
