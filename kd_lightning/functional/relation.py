"""Relation-based knowledge: how samples of a batch relate to each other, not what each one is.

Stateless cores of :mod:`kd_lightning.losses.relation`.

- Park, Kim, Lu & Cho (CVPR 2019), "Relational Knowledge Distillation".
- Tung & Mori (ICCV 2019), "Similarity-Preserving Knowledge Distillation".
- Peng et al. (ICCV 2019), "Correlation Congruence for Knowledge Distillation".
- Passalis & Tefas (ECCV 2018), "Learning Deep Representations with Probabilistic Knowledge
  Transfer".

Features of any shape ``(B, ...)`` are flattened to ``(B, D)``; student and teacher may have
different D because only ``B x B`` (or ``B x B x B``) relation tensors are compared; a different
B is a ``ValueError``. The relation tensors are computed in float32 (float64 for float64 inputs)
with autocast disabled (a matmul in bfloat16 loses the small differences these losses are made
of). Teacher tensors are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import full_precision, upcast
from kd_lightning.functional._shapes import check_same_batch

CC_KERNEL_CHOICES = ("gaussian", "bilinear")
PKT_FORMS = ("paper", "authors_code")


def _flatten_pair(
    student: torch.Tensor, teacher: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_same_batch(student, teacher, name)
    return upcast(student).flatten(1), upcast(teacher.detach()).flatten(1)


def _pairwise_distances(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean distance matrix ``(B, B)`` with an exact zero diagonal and a finite gradient."""
    sq = x.pow(2).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return d2.clamp_min(eps).sqrt() * off_diagonal


def _rkd_distance_potential(x: torch.Tensor, eps: float) -> torch.Tensor:
    d = _pairwise_distances(x, eps)
    b = x.shape[0]
    mu = d.sum() / max(b * (b - 1), 1)
    return d / mu.clamp_min(eps)


def _rkd_angle_potential(x: torch.Tensor) -> torch.Tensor:
    # e[j, i] = (x_i - x_j) / ||x_i - x_j||; angle[j, i, k] = <e_ij, e_kj> = cos of angle at x_j.
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def relational_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""Relational KD, distance-wise plus angle-wise (Park et al., CVPR 2019).

    Distance potential, normalised by the mean distance :math:`\mu` over the pairs of the batch:

    .. math:: \psi_D(t_i, t_j) = \frac{1}{\mu}\lVert t_i - t_j \rVert_2

    Angle potential at :math:`t_j`, with :math:`e^{ij} = (t_i - t_j)/\lVert t_i - t_j\rVert_2`:

    .. math:: \psi_A(t_i, t_j, t_k) = \langle e^{ij}, e^{kj} \rangle

    .. math::
        \mathcal{L}_{RKD} = \lambda_D \frac{1}{B^2}\sum_{i,j} \ell_\delta\big(\psi_D(t_i,t_j), \psi_D(s_i,s_j)\big)
        + \lambda_A \frac{1}{B^3}\sum_{i,j,k} \ell_\delta\big(\psi_A(t_i,t_j,t_k), \psi_A(s_i,s_j,s_k)\big)

    with the Huber loss :math:`\ell_\delta` (:math:`\delta = 1`). The paper sums over distinct
    pairs and triplets; the degenerate ones (i = j, or k = j) have potential 0 for both
    networks and i = k has cosine 1 for both, so they add nothing and the means above are the
    paper's sums over :math:`B^2` and :math:`B^3` entries, the normalisation under which its
    weights :math:`\lambda_D = 25`, :math:`\lambda_A = 50` are quoted. Both potentials are
    invariant to scaling the features.

    Args:
        student: student embeddings ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher: teacher embeddings ``(B, ...)``, flattened to ``(B, D_t)``.
        distance_weight: :math:`\lambda_D` (paper: 25).
        angle_weight: :math:`\lambda_A` (paper: 50).
        eps: guards square roots and the mean distance.
    """
    s, t = _flatten_pair(student, teacher, "RKD")
    loss = s.new_zeros(())
    with full_precision(s):
        if distance_weight:
            loss = loss + distance_weight * F.smooth_l1_loss(
                _rkd_distance_potential(s, eps), _rkd_distance_potential(t, eps)
            )
        if angle_weight:
            loss = loss + angle_weight * F.smooth_l1_loss(
                _rkd_angle_potential(s), _rkd_angle_potential(t)
            )
    return loss


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Similarity-preserving KD (Tung & Mori, ICCV 2019).

    With activations reshaped to :math:`Q \in \mathbb{R}^{b \times chw}`,
    :math:`\tilde G = Q Q^\top` and :math:`G_{[i,:]} = \tilde G_{[i,:]} / \lVert \tilde G_{[i,:]}\rVert_2`
    (row-wise L2 normalisation):

    .. math:: \mathcal{L}_{SP} = \frac{1}{b^2} \lVert G_T - G_S \rVert_F^2

    Args:
        student: student activations ``(B, ...)``.
        teacher: teacher activations ``(B, ...)``.
    """
    s, t = _flatten_pair(student, teacher, "Similarity-preserving KD")
    with full_precision(s):
        g_s = F.normalize(s @ s.T, dim=1)
        g_t = F.normalize(t @ t.T, dim=1)
    b = s.shape[0]
    return (g_t - g_s).pow(2).sum() / (b * b)


def _cc_correlation(x: torch.Tensor, kernel: str, gamma: float, order: int) -> torch.Tensor:
    x = F.normalize(x, dim=1)
    dot = x @ x.T
    if kernel == "bilinear":
        return dot
    # exp(-gamma ||a - b||^2) = exp(-2 gamma) exp(2 gamma a.b) for unit vectors; Taylor of
    # the second factor to order P.
    corr = torch.zeros_like(dot)
    for p in range(order + 1):
        corr = corr + (2.0 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return math.exp(-2.0 * gamma) * corr


def correlation_congruence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
) -> torch.Tensor:
    r"""Correlation congruence (Peng et al., ICCV 2019).

    The correlation matrix :math:`\psi(F) \in \mathbb{R}^{n \times n}` of the batch's
    embeddings, :math:`\psi_{ij} = k(F_i, F_j)`, and

    .. math:: \mathcal{L}_{CC} = \frac{1}{n^2}\lVert \psi(F_t) - \psi(F_s) \rVert_2^2

    Kernels (``kernel``):

    - ``"gaussian"`` (default): the paper's Gaussian RBF :math:`\exp(-\gamma\lVert F_i - F_j
      \rVert^2)` through its Taylor expansion of order P,
      :math:`\sum_{p=0}^{P} e^{-2\gamma}\frac{(2\gamma)^p}{p!}(F_i^\top F_j)^p`. The expansion
      is exact only for unit vectors, so the embeddings are L2-normalised first (the choice
      here; it also makes the loss independent of the embedding scale).
    - ``"bilinear"``: the paper's bilinear-pool kernel :math:`F_i^\top F_j`, also on
      L2-normalised embeddings (cosine similarity), so the two kernels live on one scale.

    Args:
        student: student embeddings ``(B, ...)``.
        teacher: teacher embeddings ``(B, ...)``.
        kernel: ``"gaussian"`` or ``"bilinear"``.
        gamma: RBF bandwidth :math:`\gamma` > 0 (gaussian only).
        order: Taylor order P >= 0 (gaussian only).
    """
    if kernel not in CC_KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {CC_KERNEL_CHOICES}, got {kernel!r}.")
    s, t = _flatten_pair(student, teacher, "Correlation congruence")
    with full_precision(s):
        c_s = _cc_correlation(s, kernel, gamma, order)
        c_t = _cc_correlation(t, kernel, gamma, order)
    return (c_t - c_s).pow(2).mean()


def _pkt_conditional(x: torch.Tensor, keep_self: bool, eps: float) -> torch.Tensor:
    """Row-normalised cosine kernel ``(cos + 1) / 2``; the diagonal is 0 unless ``keep_self``.

    With ``keep_self`` (the authors' code) each vector is divided by ``norm + eps`` (a zero
    vector stays zero); otherwise by ``max(norm, tiny)``.
    """
    if keep_self:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
    else:
        x = F.normalize(x, dim=1)
    kernel = 0.5 * (x @ x.T + 1.0)
    if not keep_self:
        kernel = kernel * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def probabilistic_knowledge_transfer(
    student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, form: str = "paper"
) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), cosine-similarity kernel.

    With :math:`K(a, b) = \tfrac12\big(\tfrac{a^\top b}{\lVert a\rVert\lVert b\rVert} + 1\big)`
    and the conditional probabilities

    .. math:: p_{j|i} = \frac{K(x_i, x_j)}{\sum_{k \ne i} K(x_i, x_k)},\quad j \ne i

    of teacher (:math:`p^t`) and student (:math:`p^s`), ``form="paper"`` (default) computes

    .. math::
        \mathcal{L}_{PKT} = \frac{1}{B}\sum_i \sum_{j \ne i} p^t_{j|i}
        \log\frac{p^t_{j|i}}{p^s_{j|i}}

    i.e. KL(teacher || student) of each sample's neighbour distribution, as the paper defines
    it (a sample is not its own neighbour). The paper sums over i; here it is averaged over i
    (the batch) so the scale does not grow with B. ``eps`` floors the student probability
    inside the log (the cosine kernel can reach 0).

    ``form="authors_code"`` reproduces the authors' released implementation
    (``passalis/probabilistic_kt``, copied by CRD's and torchdistill's benchmarks), which
    differs in three ways: each sample keeps its similarity with itself (:math:`K(x_i, x_i)
    = 1`, so :math:`j` runs over all B samples and the rows are normalised over all of them),
    the sum over the :math:`B \times B` entries is divided by :math:`B^2` (a mean over the
    matrix), and the ratio is smoothed, :math:`\log\frac{p^t_{j|i} + \epsilon}{p^s_{j|i} +
    \epsilon}`, with the vectors normalised by :math:`\lVert x\rVert + \epsilon`:

    .. math::
        \mathcal{L}_{code} = \frac{1}{B^2}\sum_{i}\sum_{j} \tilde p^t_{j|i}
        \log\frac{\tilde p^t_{j|i} + \epsilon}{\tilde p^s_{j|i} + \epsilon},\quad
        \tilde p_{j|i} = \frac{K(x_i, x_j)}{\sum_k K(x_i, x_k)}

    Use it to reuse weights tuned on that code (e.g. the 30000 of CRD's benchmark): the
    paper form is about B times larger for the same features (one 1/B fewer) and has no
    self-similarity mass, so such a weight does not carry over.

    Args:
        student: student features ``(B, ...)``; B >= 2.
        teacher: teacher features ``(B, ...)``.
        eps: ``"paper"``: floor of :math:`p^s` inside the logarithm; ``"authors_code"``: the
            :math:`\epsilon` above (authors: 1e-7).
        form: ``"paper"`` or ``"authors_code"``.

    Returns:
        scalar (float32, or float64 for float64 inputs).
    """
    if form not in PKT_FORMS:
        raise ValueError(f"form must be one of {PKT_FORMS}, got {form!r}.")
    s, t = _flatten_pair(student, teacher, "PKT")
    keep_self = form == "authors_code"
    with full_precision(s):
        p_s = _pkt_conditional(s, keep_self, eps)
        p_t = _pkt_conditional(t, keep_self, eps)
    if keep_self:
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
    kl = torch.xlogy(p_t, p_t) - p_t * torch.log(p_s.clamp_min(eps))
    return kl.sum(dim=1).mean()
