"""Response-based knowledge: soft targets, hard labels, logit matching (stateless functions).

These are the private cores that the loss modules in :mod:`kd_lightning.losses.soft_target`
wrap. Softmax and log-softmax always run in float32, whatever the autocast dtype: at
temperature T the logits are divided by T and small probabilities matter to the KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
"""Target value of a transfer-set sample that carries no label."""


def soft_target_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, scale_by_t2: bool = True
) -> torch.Tensor:
    r"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    .. math::
        \mathcal{L}_{KD} = T^2 \cdot \frac{1}{B} \sum_b \mathrm{KL}\big(p^{(b)} \,\|\, q^{(b)}\big),
        \quad p = \mathrm{softmax}(v / T),\ q = \mathrm{softmax}(z / T)

    with teacher logits ``v`` and student logits ``z``. The gradient of the KL with respect to a
    student logit is :math:`(q_i - p_i) / T`; the :math:`T^2` factor keeps the soft-target
    gradient magnitude independent of T (Hinton et al. 2015, section 2).

    Args:
        student: student logits, shape ``(B, C)``.
        teacher: teacher logits, shape ``(B, C)``.
        temperature: softening temperature T > 0.
        scale_by_t2: multiply by T^2 as the paper prescribes.

    Returns:
        scalar: batch-mean KL(teacher || student), times T^2.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return kl * temperature**2 if scale_by_t2 else kl


def hard_label_cross_entropy(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Cross-entropy with the ground-truth labels, ignoring unlabeled samples (``target == -1``).

    .. math:: \mathcal{L}_{CE} = -\frac{1}{|L|} \sum_{b \in L} \log \mathrm{softmax}(z^{(b)})_{y_b}

    over the labeled samples L of the batch. A batch with no labeled sample gives 0 (with a
    gradient path), never NaN, so unlabeled-only batches of a transfer set stay harmless.
    """
    logits = student.float()
    labeled = target != IGNORE_INDEX
    per_sample = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    # Sum / count without a host sync: no data-dependent indexing.
    count = labeled.sum().clamp_min(1)
    return (per_sample * labeled).sum() / count


def logit_matching_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?": regress the logits.

    .. math:: \mathcal{L}_{MSE} = \frac{1}{2B} \sum_b \lVert z^{(b)} - v^{(b)} \rVert_2^2

    The 1/2 makes the gradient exactly :math:`z_i - v_i`, the high-temperature limit of the
    soft-target gradient times :math:`N T^2` for zero-mean logits (Hinton et al. 2015, sec. 2.1).
    """
    diff = student.float() - teacher.detach().float()
    return 0.5 * diff.pow(2).sum(dim=-1).mean()
