r"""Token-level distillation for language models: divergences between per-token distributions.

The stateless cores of :mod:`kd_lightning.losses.token`. A student and a teacher each give one
logit vector over the vocabulary per token, ``(B, L, V)`` (or ``(N, V)`` for tokens already
flattened and aligned). With temperature T, per token

.. math::
    q = \mathrm{softmax}(z / T) \ \text{(student)}, \qquad p = \mathrm{softmax}(v / T) \ \text{(teacher)}

and one of these divergences :math:`D(p, q)` is taken (``objective``):

- ``"forward_kl"``: :math:`\mathrm{KL}(p \| q) = \sum_i p_i \log (p_i / q_i)`, the mass-covering
  direction of Hinton et al. (2015) and of word-level KD (Kim & Rush 2016).
- ``"reverse_kl"``: :math:`\mathrm{KL}(q \| p) = \sum_i q_i \log (q_i / p_i)`, the mode-seeking
  direction (MiniLLM, Gu et al. 2024).
- ``"jsd"``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), with
  :math:`m = \beta p + (1 - \beta) q`,

  .. math:: \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p \| m) + (1 - \beta)\, \mathrm{KL}(q \| m),
     \quad 0 < \beta < 1,

  and at the ends, as in TRL's ``GKDTrainer``: ``beta=0`` is the forward KL
  :math:`\mathrm{KL}(p \| q)` and ``beta=1`` the reverse KL :math:`\mathrm{KL}(q \| p)`. The ends
  are the limits of the *scaled* divergence, :math:`\lim_{\beta \to 0} \mathrm{JSD}_\beta / \beta
  = \mathrm{KL}(p \| q)` and :math:`\lim_{\beta \to 1} \mathrm{JSD}_\beta / (1 - \beta) =
  \mathrm{KL}(q \| p)` (Huszár 2015); the unscaled :math:`\mathrm{JSD}_\beta` itself tends to 0
  there, so the loss scale jumps at the ends. ``beta=0.5`` is the symmetric JSD (bounded by
  :math:`\log 2`).
- ``"total_variation"``: :math:`\tfrac12 \sum_i |p_i - q_i|` (bounded by 1; Wen et al. 2023,
  f-divergence KD).

The loss is :math:`T^2 \sum_{b,t} w_{b,t}\, D(p_{b,t}, q_{b,t})` (the :math:`T^2` factor of
Hinton et al. 2015 keeps the gradient scale of the KLs independent of T; ``scale_by_t2=False``
drops it), with token weights :math:`w` from the mask (:func:`token_weights`):

- ``reduction="token"`` (default): the mean over all kept tokens of the batch,
  :math:`w_{b,t} = k_{b,t} / \sum k`; long sequences weigh more (TRL's "batchmean" over tokens).
- ``reduction="sequence"``: the mean over sequences of each sequence's mean over its kept tokens,
  :math:`w_{b,t} = k_{b,t} / (n_b \cdot |\{b : n_b > 0\}|)` with :math:`n_b = \sum_t k_{b,t}`;
  every sequence weighs the same. Sequences with no kept token are left out of the mean.

A token t is kept (:math:`k_{b,t} = 1`) when ``target[b, t] != ignore_index`` and
``mask[b, t] != 0``. With ``shift=True`` (causal LMs: the logits at position t predict token t+1)
the last position is dropped and position t is kept when ``target[b, t+1]`` is not ignored and
both ``mask[b, t]`` and ``mask[b, t+1]`` are set (the token read and the token predicted are
real). ``shift=False`` is for masked LMs and per-token classifiers. A batch with no kept token
gives 0 with a gradient path. Dropped tokens change nothing: their logits (even inf or NaN) are
replaced before any arithmetic, so they get exactly zero gradient.

Precision and -inf: softmax and log-softmax run in float32 under any autocast (float64 inputs
stay float64). A teacher logit of ``-inf`` (a masked or padded vocabulary entry) is a
probability of exactly 0, and :math:`0 \log 0 = 0` is taken in the algebra (selection, never
clamping), so the loss and its gradient stay finite. The reverse KL is infinite whenever the
student puts mass where the teacher puts none, so for ``"reverse_kl"`` (and JSD at ``beta=1``) the
student distribution is taken over the teacher's support, :math:`q \propto \exp(z/T)` on
:math:`\{i : v_i > -\infty\}`; entries outside get zero gradient (pair it with the forward KL or
cross-entropy to push student mass off them). Every other objective uses the full student
softmax. A token whose teacher logits are all ``-inf`` has no distribution and gives NaN.

Vocabularies: student and teacher must have the same vocabulary size (:func:`check_vocab_sizes`),
or ``crop_vocab=True`` compares the first ``min(V_s, V_t)`` entries only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import compute_dtype, full_precision
from kd_lightning.validation import temperature as check_temperature

TOKEN_IGNORE_INDEX = -100
"""Label of an ignored token (Hugging Face and PyTorch ``cross_entropy`` convention)."""

OBJECTIVES = ("forward_kl", "reverse_kl", "jsd", "total_variation")
REDUCTIONS = ("token", "sequence")


def check_token_options(objective: str, beta: float, temperature: float, reduction: str) -> None:
    """Raise a ``ValueError`` naming the valid choices for a bad objective, beta, T or reduction."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must lie in [0, 1], got {beta}: 0 is the forward KL(teacher || student), "
            "1 the reverse KL(student || teacher), 0.5 the symmetric JSD."
        )
    check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_vocab_sizes(student_vocab: int, teacher_vocab: int, crop_vocab: bool = False) -> int:
    """The vocabulary size both sides are compared over; a ``ValueError`` if they differ.

    Models of one tokenizer often pad their embedding to a multiple of 64 or 128 (e.g. 152064
    vs 151936 rows); the rows past the tokenizer's size are padding. With ``crop_vocab=True``
    both sides are cropped to the shared range ``[0, min(V_s, V_t))``: the padded rows are
    dropped and both softmaxes are taken over the shared range only. Models of different
    tokenizers cannot be distilled token by token at all (their vocabularies do not align).

    Args:
        student_vocab: the student's vocabulary size (last logit dimension / output rows).
        teacher_vocab: the teacher's vocabulary size.
        crop_vocab: allow different sizes and compare the shared range.

    Returns:
        ``student_vocab`` when equal, else ``min(student_vocab, teacher_vocab)`` (cropping).
    """
    if student_vocab == teacher_vocab:
        return student_vocab
    shared = min(student_vocab, teacher_vocab)
    if not crop_vocab:
        raise ValueError(
            f"Student vocabulary size {student_vocab} != teacher vocabulary size "
            f"{teacher_vocab}. If both use the same tokenizer and the extra rows are embedding "
            f"padding, pass crop_vocab=True to compare the shared first {shared} entries "
            "(padded rows are dropped). Different tokenizers cannot be distilled token by token."
        )
    return shared


def crop_to_shared_vocab(
    student: torch.Tensor, teacher: torch.Tensor, crop_vocab: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the last (vocabulary) dimensions with :func:`check_vocab_sizes`; crop if allowed.

    A shape check only (no host sync); cropping returns views.
    """
    size = check_vocab_sizes(student.shape[-1], teacher.shape[-1], crop_vocab)
    return student[..., :size], teacher[..., :size]


def token_weights(
    shape: tuple[int, ...],
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    shift: bool = True,
    reduction: str = "token",
    ignore_index: int = TOKEN_IGNORE_INDEX,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` (``shape``) with ``loss = sum(w * D)``; 0 where a token is dropped.

    See the module docstring for which tokens are kept under ``shift`` and how ``reduction``
    weighs them. ``shape`` is ``(B, L)`` for sequences or ``(N,)`` for flattened tokens (then
    ``shift`` must be False and ``reduction`` ``"token"``). No host sync.
    """
    if len(shape) not in (1, 2):
        raise ValueError(
            f"Token logits must be (B, L, V) or (N, V); got leading shape {tuple(shape)}."
        )
    if len(shape) == 1 and shift:
        raise ValueError(
            "shift=True needs (B, L, V) logits to shift along L; for (N, V) tokens that are "
            "already aligned pass shift=False."
        )
    if len(shape) == 1 and reduction == "sequence":
        raise ValueError(
            "reduction='sequence' needs (B, L, V) logits to know the sequences; "
            "use reduction='token' for (N, V) tokens."
        )
    for name, given in (("target", target), ("mask", mask)):
        if given is not None and tuple(given.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have the logits' leading shape {tuple(shape)}, got "
                f"{tuple(given.shape)}."
            )
    if device is None:
        device = target.device if target is not None else mask.device if mask is not None else None
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    if shift:
        # Position t predicts token t+1: the label and the mask of t+1 decide; the last
        # position predicts nothing in the sequence.
        keep[:, -1] = False
        if target is not None:
            keep[:, :-1] &= target[:, 1:] != ignore_index
        if mask is not None:
            real = mask != 0
            keep[:, :-1] &= real[:, 1:] & real[:, :-1]
    else:
        if target is not None:
            keep &= target != ignore_index
        if mask is not None:
            keep &= mask != 0
    keep = keep.to(dtype)
    if reduction == "token":
        return keep / keep.sum().clamp_min(1)
    per_sequence = keep.sum(dim=1, keepdim=True)
    sequences = (per_sequence > 0).sum().clamp_min(1)
    return keep / per_sequence.clamp_min(1) / sequences


def flat_token_weights(
    leading: tuple[int, ...] | torch.Size,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    shift: bool,
    reduction: str,
    ignore_index: int,
    device: torch.device | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`token_weights` of the leading shape ``(B, L)`` / ``(N,)``, flattened to ``(N,)``."""
    return token_weights(
        tuple(leading),
        target,
        mask,
        shift=shift,
        reduction=reduction,
        ignore_index=ignore_index,
        device=device,
        dtype=dtype,
    ).reshape(-1)


def check_token_layout(
    student: torch.Size,
    teacher: torch.Size,
    student_what: str = "logits",
    teacher_what: str = "logits",
) -> None:
    """Refuse student and teacher tensors whose shapes differ (compare only what must match)."""
    if tuple(student) != tuple(teacher):
        raise ValueError(
            f"Student {student_what} {tuple(student)} and teacher {teacher_what} "
            f"{tuple(teacher)} must have the same (B, L) / (N,) token layout."
        )


def dense_token_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    objective: str,
    beta: float,
    temperature: float,
    shift: bool,
    reduction: str,
    ignore_index: int,
    crop_vocab: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(student, teacher, weights)`` of a loss between two models' logits, after every check.

    Checks the options (:func:`check_token_options`), the vocabularies (cropped to the shared
    range when ``crop_vocab``; the teacher detached) and the token layouts, in this order; the
    flattened token weights ``(N,)`` are in the dtype the loss computes in (``weights.dtype``).
    """
    check_token_options(objective, beta, temperature, reduction)
    student, teacher = crop_to_shared_vocab(student, teacher.detach(), crop_vocab)
    check_token_layout(student.shape, teacher.shape)
    dtype = compute_dtype(student, teacher)
    weights = flat_token_weights(
        student.shape[:-1], target, mask, shift, reduction, ignore_index, student.device, dtype
    )
    return student, teacher, weights


def scaled_rows(
    logits: torch.Tensor, keep: torch.Tensor, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``logits / T`` in ``dtype`` with dropped rows (``keep`` False, shape ``(N, 1)``) set to 0.

    Selecting (not multiplying) makes dropped rows' values irrelevant, inf and NaN included.
    """
    rows = torch.where(keep, logits, 0.0).to(dtype)
    # A fresh tensor (where's output), so dividing in place is safe, for autograd too.
    return rows if temperature == 1.0 else rows.div_(temperature)


def effective_objective(objective: str, beta: float) -> str:
    """The JSD's ends are the KLs: ``beta=0`` -> ``"forward_kl"``, ``beta=1`` -> ``"reverse_kl"``."""
    if objective == "jsd" and beta == 0.0:
        return "forward_kl"
    if objective == "jsd" and beta == 1.0:
        return "reverse_kl"
    return objective


def token_log_probs(
    student: torch.Tensor, teacher: torch.Tensor, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q, log p)`` from temperature-scaled logits ``(N, V)``.

    For the reverse KL the student is renormalised over the teacher's support (entries where the
    teacher is ``-inf`` are removed from the student too).
    """
    log_p = F.log_softmax(teacher, dim=-1)
    if objective == "reverse_kl":
        student = student.masked_fill(teacher == -math.inf, -math.inf)
    return F.log_softmax(student, dim=-1), log_p


def divergence_rows(log_q: torch.Tensor, log_p: torch.Tensor, objective: str, beta: float = 0.5):
    """Per-row divergence ``D(p, q)`` ``(N,)`` from the log-probabilities of :func:`token_log_probs`.

    Plain differentiable torch: autograd gives the gradient. ``log_p`` may hold ``-inf``; every
    term with a zero probability is selected away *before* a product, so 0 log 0 = 0 holds in the
    value and in the gradient (``q * (-inf - -inf)`` would be NaN in both). ``objective`` is
    one of :data:`OBJECTIVES` after :func:`effective_objective`.
    """
    p = log_p.exp()
    if objective == "reverse_kl":
        gap = torch.where(log_p == -math.inf, 0.0, log_q - log_p)
        return (log_q.exp() * gap).sum(dim=-1)
    if objective == "forward_kl":
        return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)
    if objective == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        teacher_term = (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(dim=-1)
        student_term = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
        return beta * teacher_term + (1.0 - beta) * student_term
    if objective == "total_variation":
        return 0.5 * (p - log_q.exp()).abs().sum(dim=-1)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")


def token_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
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
    crop_vocab: bool = False,
) -> torch.Tensor:
    r"""Token-level distillation loss :math:`T^2 \sum_{b,t} w_{b,t} D(p_{b,t}, q_{b,t})` (naive form).

    Materialises the full ``(N, V)`` probabilities; see :mod:`kd_lightning.functional.token_chunked`
    for the memory-bounded forms with equal values and gradients.

    Args:
        student: student logits, ``(B, L, V)`` or ``(N, V)``.
        teacher: teacher logits of the same shape (detached here; ``-inf`` allowed).
        target: labels ``(B, L)`` / ``(N,)``; ``ignore_index`` marks dropped tokens.
        mask: attention mask ``(B, L)`` / ``(N,)``; 0 marks padding.
        objective: one of ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"total_variation"``.
        beta: the JSD's interpolation (0 forward KL, 1 reverse KL); other objectives ignore it.
        temperature: softening temperature T > 0.
        scale_by_t2: multiply by T^2.
        shift: causal-LM next-token alignment (see the module docstring).
        reduction: ``"token"`` (mean over kept tokens) or ``"sequence"``.
        ignore_index: the label of ignored tokens.
        crop_vocab: compare the shared vocabulary range when sizes differ.

    Returns:
        scalar in float32 (float64 for float64 inputs).
    """
    student, teacher, weights = dense_token_inputs(
        student, teacher, target, mask, objective, beta, temperature, shift, reduction,
        ignore_index, crop_vocab,
    )  # fmt: skip
    dtype = weights.dtype
    vocab = student.shape[-1]
    with full_precision(student):
        keep = (weights > 0).unsqueeze(-1)
        objective = effective_objective(objective, beta)
        # The scaled copies are temporaries: only the log-probabilities stay for backward.
        log_q, log_p = token_log_probs(
            scaled_rows(student.reshape(-1, vocab), keep, temperature, dtype),
            scaled_rows(teacher.reshape(-1, vocab), keep, temperature, dtype),
            objective,
        )
        loss = (divergence_rows(log_q, log_p, objective, beta) * weights).sum()
    return loss * temperature**2 if scale_by_t2 else loss


def token_forward_kl(student, teacher, target=None, mask=None, **options) -> torch.Tensor:
    """:func:`token_divergence` with the forward KL(teacher || student)."""
    return token_divergence(student, teacher, target, mask, objective="forward_kl", **options)


def token_reverse_kl(student, teacher, target=None, mask=None, **options) -> torch.Tensor:
    """:func:`token_divergence` with the reverse KL(student || teacher) (over the teacher's support)."""
    return token_divergence(student, teacher, target, mask, objective="reverse_kl", **options)


def token_generalized_jsd(
    student, teacher, target=None, mask=None, *, beta: float = 0.5, **options
) -> torch.Tensor:
    """:func:`token_divergence` with GKD's generalized JSD (beta 0: forward KL, 1: reverse KL)."""
    return token_divergence(student, teacher, target, mask, objective="jsd", beta=beta, **options)


def token_total_variation(student, teacher, target=None, mask=None, **options) -> torch.Tensor:
    """:func:`token_divergence` with the total variation distance ``1/2 sum |p - q|``."""
    return token_divergence(student, teacher, target, mask, objective="total_variation", **options)
