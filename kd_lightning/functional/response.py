"""Response-based knowledge beyond Hinton's KL: DKD, logit standardization, DIST.

Stateless cores of :mod:`kd_lightning.losses.response`.

- Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".
- Sun, Ren, Li, Wang & Cao (CVPR 2024), "Logit Standardization in Knowledge Distillation".
- Huang, You, Wang, Qian & Xu (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

Every softmax, log-softmax and standardisation runs in float32 for float16/bfloat16 inputs,
whatever the autocast dtype; float64 inputs stay float64. A teacher logit of ``-inf`` (a masked
class) is a probability of 0, never a NaN. Teacher tensors are detached: gradients reach the
student only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.functional._divergence import kl_from_log_probs
from kd_lightning.functional._precision import upcast
from kd_lightning.functional._shapes import check_same_shape
from kd_lightning.functional.soft_target import IGNORE_INDEX

DKD_UNLABELED_CHOICES = ("ignore", "teacher_argmax")


_BATCH_LOGITS_FIX = (
    "Both must be logits over the same classes: squeeze the side with the extra dimension "
    "(e.g. teacher.squeeze(1) for (B, 1, C)); per-token logits (B, L, V) must be flattened to "
    "(B * L, V) first (with the target, for DKD)."
)


def _check_batch_logits(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    check_same_shape(
        student, teacher, name, layout="(B, C)", fix=_BATCH_LOGITS_FIX, min_dim=2, max_dim=2
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
    _check_batch_logits(student, teacher, "DKD")
    if unlabeled not in DKD_UNLABELED_CHOICES:
        raise ValueError(f"unlabeled must be one of {DKD_UNLABELED_CHOICES}, got {unlabeled!r}.")
    if student.shape[-1] < 2:
        raise ValueError("DKD needs at least 2 classes: NCKD is a distribution over C - 1 classes.")
    if target.shape != student.shape[:1]:
        raise ValueError(
            f"DKD: target {tuple(target.shape)} must hold one label per row of the logits "
            f"{tuple(student.shape)}, i.e. have shape ({student.shape[0]},)."
        )
    z = upcast(student) / temperature
    v = upcast(teacher.detach()) / temperature

    labeled = target != IGNORE_INDEX
    if unlabeled == "teacher_argmax":
        # The teacher's prediction stands in for the missing label.
        target = torch.where(labeled, target, v.argmax(dim=-1))
        keep = torch.ones_like(z[:, 0])
    else:
        target = target.clamp_min(0)
        keep = labeled.to(z.dtype)
    gt = F.one_hot(target, z.shape[-1]).bool()

    # Target-class KD on the binary distribution b = [p_t, 1 - p_t], in log space:
    # log(1 - p_t) = logsumexp over non-target logits - logsumexp over all logits. The target
    # logit is gathered (not multiplied by the one-hot mask: -inf * 0 would be NaN).
    def log_binary(logits: torch.Tensor) -> torch.Tensor:
        lse_all = logits.logsumexp(dim=-1)
        log_pt = logits.gather(-1, target[:, None])[:, 0] - lse_all
        log_rest = logits.masked_fill(gt, float("-inf")).logsumexp(dim=-1) - lse_all
        return torch.stack([log_pt, log_rest], dim=-1)

    tckd = kl_from_log_probs(log_binary(v), log_binary(z))

    # Non-target KD: softmax over the C - 1 non-target classes. The target entry is -inf, a
    # probability of 0, and so contributes 0 (as does any class the teacher masks with -inf).
    # A teacher that masks every non-target class has no non-target distribution (its weight
    # 1 - p_t in Eq. 7 is 0): NCKD is 0 there, computed on a placeholder row so that no NaN
    # reaches the gradient.
    v_rest, z_rest = v.masked_fill(gt, float("-inf")), z.masked_fill(gt, float("-inf"))
    has_rest = (v_rest > float("-inf")).any(dim=-1)
    v_rest = torch.where(has_rest[:, None], v_rest, z_rest.detach())
    nckd = kl_from_log_probs(F.log_softmax(v_rest, dim=-1), F.log_softmax(z_rest, dim=-1))
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

    A ``-inf`` teacher logit is a probability of 0 and its terms are 0: a masked non-target
    class drops out of NCKD; a masked target class makes :math:`b^T = [0, 1]`. A teacher that
    masks every non-target class has no non-target distribution; its NCKD is 0 (its weight
    :math:`1 - p_t^T` in the KD decomposition is 0 too).

    Args:
        student: student logits ``(B, C)``, C >= 2.
        teacher: teacher logits ``(B, C)``.
        target: labels ``(B,)`` (long), ``-1`` where unlabeled.
        alpha: weight of TCKD (paper: 1.0).
        beta: weight of NCKD (paper: 8.0 on CIFAR-100, 0.5 on ImageNet).
        temperature: softmax temperature T (paper: 4 on CIFAR-100, 1 on ImageNet).
        unlabeled: ``"ignore"`` or ``"teacher_argmax"``, see above.

    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    tckd, nckd, keep = _dkd_terms(student, teacher, target, temperature, unlabeled)
    per_sample = alpha * tckd + beta * nckd
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0) * temperature**2


def _zscore(logits: torch.Tensor, eps: float, unbiased: bool) -> torch.Tensor:
    """Z-score of each row over its finite entries; ``-inf`` entries (masked classes) stay ``-inf``.

    The square root is taken only where the variance is positive, so constant logits (a
    freshly initialised head) get a zero gradient through the standard deviation, not NaN.
    """
    finite = logits > float("-inf")
    x = torch.where(finite, logits, torch.zeros_like(logits))
    count = finite.sum(dim=-1, keepdim=True)
    mean = x.sum(dim=-1, keepdim=True) / count.clamp_min(1)
    centred = torch.where(finite, x - mean, torch.zeros_like(x))
    dof = (count - 1 if unbiased else count).clamp_min(1)
    var = centred.pow(2).sum(dim=-1, keepdim=True) / dof
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), 0.0)
    return torch.where(finite, centred / (std + eps), float("-inf"))


def logit_standardization_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 2.0,
    eps: float = 1e-7,
    unbiased: bool = True,
) -> torch.Tensor:
    r"""KD on Z-score standardised logits (Sun et al., CVPR 2024).

    .. math::
        \mathcal{Z}(z; \tau) = \frac{z - \bar z}{\tau\, (\sigma(z) + \epsilon)},\quad
        \sigma(z) = \Big(\frac{1}{C - 1}\sum_k (z_k - \bar z)^2\Big)^{1/2}

    per row, for teacher and student alike, then

    .. math::
        \mathcal{L} = \tau^2 \cdot \frac{1}{N}\sum_n \mathrm{KL}\big(
        \mathrm{softmax}(\mathcal{Z}(v^{(n)};\tau)) \,\|\,
        \mathrm{softmax}(\mathcal{Z}(z^{(n)};\tau))\big)

    The effective temperature of each row is :math:`\tau\sigma`, so the student only has to
    match the teacher's logit *relations*, not their range.

    Which standard deviation: the paper calls :math:`\sigma` the standard deviation of the
    logits; the authors' released code (``logit-standardization-KD``, and torchdistill after
    it) computes it with ``Tensor.std``, the unbiased estimator with :math:`1/(C-1)`, and adds
    ``eps = 1e-7`` to it. That is the default here (``unbiased=True``), because the paper's
    results and its tuned base temperatures and loss weights were produced with it; for
    C = 3, :math:`z_s = (1, 2, 4)`, :math:`z_t = (3, 1, 2)`, :math:`\tau = 2` the loss is
    0.9517, as the authors' code gives. ``unbiased=False`` uses the population standard
    deviation (:math:`1/C`); it scales every effective temperature by
    :math:`\sqrt{C/(C-1)}` (1.005 for C = 100, 1.22 for C = 3; the example gives 1.4322).

    A ``-inf`` logit is a masked class: the mean and standard deviation are taken over the
    row's finite entries (C above is their count), the masked entry stays ``-inf``, a
    probability of 0, and contributes 0 to the KL.

    Args:
        student: student logits ``(B, C)`` or ``(B, L, V)``.
        teacher: teacher logits, the same shape.
        temperature: base temperature :math:`\tau` > 0.
        eps: added to the standard deviation (authors: 1e-7); guards constant logits.
        unbiased: ``True`` for the :math:`1/(C-1)` standard deviation of the authors' code,
            ``False`` for the population one.

    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    check_same_shape(student, teacher, "Logit standardization KD")
    z = _zscore(upcast(student), eps, unbiased) / temperature
    v = _zscore(upcast(teacher.detach()), eps, unbiased) / temperature
    log_q = F.log_softmax(z, dim=-1)
    log_p = F.log_softmax(v, dim=-1)
    return kl_from_log_probs(log_p, log_q).mean() * temperature**2


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
    how each class's probability varies across the batch (needs B >= 2). A ``-inf`` teacher
    logit is a probability of 0 in :math:`Y^t` (a masked class), which the correlations use as
    they are.

    Args:
        student: student logits ``(B, C)``.
        teacher: teacher logits ``(B, C)``.
        beta: weight of the inter-class term (paper: 1).
        gamma: weight of the intra-class term (paper: 1).
        temperature: softmax temperature :math:`\tau` (paper: 1).
        eps: guards the cosine of constant vectors.

    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    _check_batch_logits(student, teacher, "DIST")
    y_s = F.softmax(upcast(student) / temperature, dim=-1)
    y_t = F.softmax(upcast(teacher.detach()) / temperature, dim=-1)
    inter = _pearson_distance(y_s, y_t, dim=1, eps=eps).mean()
    intra = _pearson_distance(y_s, y_t, dim=0, eps=eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)
