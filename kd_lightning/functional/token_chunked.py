r"""Memory-bounded token-level distillation: chunked logits and fused output layer.

The same loss as :func:`kd_lightning.functional.token.token_divergence` (same equation, masking,
shift, reduction, temperature, ``-inf`` handling; see that module), computed over row chunks of
the flattened ``(N, V)`` tokens with hand-derived gradients, so that memory grows with the chunk,
not with N x V:

- :func:`chunked_token_divergence` takes both models' logits. Forward keeps only the inputs
  (which exist anyway); backward recomputes each chunk's probabilities and writes the student's
  logit gradient chunk by chunk. The full ``(N, V)`` probabilities of the two models are never
  held; the only new ``(N, V)`` tensor is the logit gradient autograd asks for.
- :func:`fused_linear_token_divergence` takes the student's final hidden states ``(N, H)`` and
  output-layer weight ``(V, H)`` (+ bias) and forms each chunk's logits itself, so the student's
  ``(N, V)`` logits never exist; the teacher comes as logits or as hidden states + weight. The
  gradients with respect to hidden states, weight and bias are accumulated during the forward
  pass (one output-layer product per chunk, two for the gradients: the same work as the naive
  graph, no recomputation) and scaled by the incoming gradient in backward. This is the idea of
  Liger-Kernel's fused linear JSD (Hsu et al. 2024), written here in plain torch.

Gradient of one token's divergence with respect to the scaled student logits :math:`s = z/T`
(softmax Jacobian :math:`\partial q_j / \partial s_i = q_j(\delta_{ij} - q_i)`):

- forward KL: :math:`q - p`;
- reverse KL: :math:`q_i (\log(q_i/p_i) - \mathrm{KL}(q \| p))` on the teacher's support, 0 off it;
- JSD: :math:`q_i (g_i - \sum_j q_j g_j)` with :math:`g = (1 - \beta) \log (q / m)`
  (:math:`\partial\, \mathrm{JSD}_\beta / \partial q_i = (1-\beta) \log(q_i / m_i)`);
- total variation: the same with :math:`g = \tfrac12 \operatorname{sign}(q - p)` (0 at ties, like
  autograd's ``abs``).

The loss is :math:`c \sum_n w_n D_n` with :math:`c = T^2` (or 1), so the logit gradient of row n is
:math:`c\, w_n \nabla_s D_n / T`. The tests check values and gradients against the autograd of
the naive form. Neither function supports double backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kd_lightning.functional._precision import compute_dtype, full_precision
from kd_lightning.functional.token import (
    TOKEN_IGNORE_INDEX,
    check_token_layout,
    check_token_options,
    check_vocab_sizes,
    dense_token_inputs,
    effective_objective,
    flat_token_weights,
    scaled_rows,
)

MAX_CHUNKS = 16
MIN_CHUNK_ELEMENTS = 1 << 23
MAX_CHUNK_ELEMENTS = 1 << 26


def default_chunk_rows(tokens: int, vocab: int) -> int:
    """Tokens per chunk by default: ``ceil(N / 16)``, kept between 8M and 64M logits per chunk.

    Each chunk reads the whole output weight (and, fused, updates its whole gradient) once, so
    few chunks keep the step close to the naive one's time; a chunk of N/16 tokens keeps the
    chunk buffers at a few percent of the naive form's ``(N, V)`` buffers. The bounds keep tiny
    batches from using needlessly small chunks (at least 32 MiB of float32 logits) and huge ones
    from using huge chunks (at most 256 MiB).
    """
    vocab = max(1, vocab)
    rows = -(-tokens // MAX_CHUNKS)
    rows = max(rows, MIN_CHUNK_ELEMENTS // vocab)
    return max(1, min(rows, MAX_CHUNK_ELEMENTS // vocab))


def chunk_log_probs(
    student_logits: torch.Tensor | Callable[[], torch.Tensor],
    teacher_logits: torch.Tensor | Callable[[], torch.Tensor],
    keep: torch.Tensor,
    temperature: float,
    dtype: torch.dtype,
    objective: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q, log p)`` of one chunk, as :func:`~kd_lightning.functional.token.token_log_probs`.

    The raw chunk logits are tensors (slices of existing logits) or zero-argument callables that
    compute them (an output layer), called one after the other under the caller's autocast, like
    the models' own output layers; at most three chunk buffers are alive here: each scaled copy
    is dropped as soon as its log-softmax exists.
    ``objective`` is already resolved by ``effective_objective`` (JSD ends are the KLs).
    """
    teacher = teacher_logits() if callable(teacher_logits) else teacher_logits
    with full_precision(teacher):
        teacher = scaled_rows(teacher, keep, temperature, dtype)
        outside = teacher == -math.inf if objective == "reverse_kl" else None
        log_p = F.log_softmax(teacher, dim=-1)
    del teacher
    student = student_logits() if callable(student_logits) else student_logits
    with full_precision(student):
        student = scaled_rows(student, keep, temperature, dtype)
        if outside is not None:
            student.masked_fill_(outside, -math.inf)  # a fresh buffer (scaled_rows' output)
        log_q = F.log_softmax(student, dim=-1)
    return log_q, log_p


def divergence_rows_and_grad(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    objective: str,
    beta: float,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence ``(c,)`` and its gradient ``(c, V)`` w.r.t. the scaled student logits.

    Takes one chunk's log-probabilities from :func:`chunk_log_probs` and consumes ``log_q``
    (it is overwritten). The gradient is ``None`` when ``need_grad`` is False.
    """
    objective = effective_objective(objective, beta)
    # In-place updates reuse the chunk's buffers: they set the peak memory of the
    # memory-bounded forms. No autograd runs here.
    if objective == "reverse_kl":
        gap = (log_q - log_p).masked_fill_(log_p == -math.inf, 0.0)
        q = log_q.exp_()
        rows = (q * gap).sum(dim=-1)
        return rows, (gap.sub_(rows.unsqueeze(-1)).mul_(q) if need_grad else None)
    p = log_p.exp()
    if objective == "forward_kl":
        rows = (log_p - log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
        return rows, (log_q.exp_().sub_(p) if need_grad else None)
    if objective == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        teacher_term = (log_p - log_m).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
        del p
        q = log_q.exp()
        direction = log_q.sub_(log_m)  # log(q / m)
        rows = beta * teacher_term + (1.0 - beta) * (q * direction).sum(dim=-1)
        direction.mul_(1.0 - beta)
    elif objective == "total_variation":
        q = log_q.exp_()
        direction = q - p
        rows = 0.5 * direction.abs().sum(dim=-1)
        direction.sign_().mul_(0.5)
    else:
        raise ValueError(
            "objective must be one of ('forward_kl', 'reverse_kl', 'jsd', 'total_variation'), "
            f"got {objective!r}."
        )
    if not need_grad:
        return rows, None
    mean = (q * direction).sum(dim=-1, keepdim=True)
    return rows, direction.sub_(mean).mul_(q)


def _row_spans(count: int, chunk: int):
    return ((start, min(start + chunk, count)) for start in range(0, count, chunk))


def _logit_chunks(student, teacher, weights, objective, temperature, chunk):
    """``(start, stop, w, log q, log p)`` per chunk of rows of ``(N, V)`` logits and weights."""
    for start, stop in _row_spans(student.shape[0], chunk):
        w = weights[start:stop]
        keep = (w > 0).unsqueeze(-1)
        log_q, log_p = chunk_log_probs(
            student[start:stop], teacher[start:stop], keep, temperature, weights.dtype, objective
        )
        yield start, stop, w, log_q, log_p


def _function_options(
    objective: str,
    beta: float,
    temperature: float,
    scale_by_t2: bool,
    chunk_size: int | None,
    tokens: int,
    vocab: int,
) -> tuple[str, float, float, float, int]:
    """The autograd functions' last arguments: ``(objective, beta, T, scale, chunk)``.

    ``objective`` resolved by ``effective_objective``, ``scale`` :math:`T^2` (or 1) and ``chunk``
    the tokens per chunk (:func:`chunk_rows`, which checks ``chunk_size``).
    """
    chunk = chunk_rows(chunk_size, tokens, vocab)
    scale = temperature**2 if scale_by_t2 else 1.0
    return effective_objective(objective, beta), float(beta), float(temperature), scale, chunk


class _ChunkedTokenDivergence(torch.autograd.Function):
    """Loss over ``(N, V)`` logits, chunk by chunk; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, student, teacher, weights, objective, beta, temperature, scale, chunk):
        dtype = weights.dtype
        total = torch.zeros((), dtype=dtype, device=student.device)
        chunks = _logit_chunks(student, teacher, weights, objective, temperature, chunk)
        for _, _, w, log_q, log_p in chunks:
            rows, _ = divergence_rows_and_grad(log_q, log_p, objective, beta, need_grad=False)
            total += (rows * w).sum()
        ctx.save_for_backward(student, teacher, weights)
        ctx.options = (objective, beta, temperature, scale, chunk)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        student, teacher, weights = ctx.saved_tensors
        objective, beta, temperature, scale, chunk = ctx.options
        dtype = weights.dtype
        grad = torch.empty_like(student)
        factor = grad_output.to(dtype) * (scale / temperature)
        with full_precision(student):
            chunks = _logit_chunks(student, teacher, weights, objective, temperature, chunk)
            for start, stop, w, log_q, log_p in chunks:
                _, row_grad = divergence_rows_and_grad(log_q, log_p, objective, beta)
                grad[start:stop] = row_grad.mul_((w * factor).unsqueeze(-1))
        return grad, None, None, None, None, None, None, None


class _FusedLinearTokenDivergence(torch.autograd.Function):
    """Loss from student hidden states and output weight; gradients accumulated in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher,
        teacher_weight,
        teacher_bias,
        weights,
        objective,
        beta,
        temperature,
        scale,
        chunk,
    ):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or need_bias
        dtype = weights.dtype
        # Gradient products in the weight's dtype with autocast off: an in-place accumulation
        # must not be silently cast to half precision.
        grad_dtype = weight.dtype
        grad_hidden = (
            torch.empty(hidden.shape, dtype=grad_dtype, device=hidden.device)
            if need_hidden
            else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=grad_dtype, device=weight.device)
            if need_weight
            else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        )
        factor = scale / temperature
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start, stop in _row_spans(hidden.shape[0], chunk):
            w = weights[start:stop]
            keep = (w > 0).unsqueeze(-1)
            h = torch.where(keep, hidden[start:stop], 0)
            teacher_logits = teacher[start:stop]
            if teacher_weight is not None:  # hidden states: the teacher's chunk logits
                teacher_logits = partial(F.linear, teacher_logits, teacher_weight, teacher_bias)
            log_q, log_p = chunk_log_probs(
                partial(F.linear, h, weight, bias),
                teacher_logits,
                keep,
                temperature,
                dtype,
                objective,
            )
            with full_precision(hidden):
                rows, row_grad = divergence_rows_and_grad(log_q, log_p, objective, beta, need_grad)
                del log_q, log_p
                total += (rows * w).sum()
                if not need_grad:
                    continue
                row_grad = row_grad.mul_((w * factor).unsqueeze(-1))
                if need_bias:
                    grad_bias += row_grad.sum(dim=0)
                if need_hidden:
                    torch.mm(row_grad, weight, out=grad_hidden[start:stop])
                if need_weight:
                    grad_weight.addmm_(row_grad.T, h.to(grad_dtype))
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes, strict=True):
            # In place: these buffers were made for this call and are used once.
            grads.append(None if grad is None else grad.mul_(grad_output.to(grad.dtype)).to(dtype))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None)


def chunked_token_divergence(
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`~kd_lightning.functional.token.token_divergence`, chunked over tokens.

    Same arguments, shapes, value and gradient; ``chunk_size`` is the number of tokens (rows of
    the flattened ``(N, V)`` logits) per chunk, by default :func:`default_chunk_rows`. Peak extra
    memory: a few ``(chunk_size, V)`` buffers plus the student logits' gradient.
    """
    student, teacher, weights = dense_token_inputs(
        student, teacher, target, mask, objective, beta, temperature, shift, reduction,
        ignore_index, crop_vocab,
    )  # fmt: skip
    size = student.shape[-1]
    options = _function_options(
        objective, beta, temperature, scale_by_t2, chunk_size, weights.numel(), size
    )
    with full_precision(student):
        return _ChunkedTokenDivergence.apply(
            student.reshape(-1, size), teacher.reshape(-1, size), weights, *options
        )


def fused_linear_token_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    shift: bool = True,
    reduction: str = "token",
    ignore_index: int = TOKEN_IGNORE_INDEX,
    crop_vocab: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Token-level distillation from the student's hidden states, never forming its full logits.

    The value equals :func:`~kd_lightning.functional.token.token_divergence` on the student
    logits ``student_hidden @ student_weight.T + student_bias``; gradients flow to
    ``student_hidden``, ``student_weight`` and ``student_bias`` (whichever require grad), never
    to the teacher.

    Args:
        student_hidden: the student's final hidden states (the input of its output layer),
            ``(B, L, H)`` or ``(N, H)``.
        student_weight: the student's output-layer weight ``(V_s, H)`` (``lm_head.weight``).
        teacher: the teacher's logits ``(B, L, V_t)`` / ``(N, V_t)``, or, when
            ``teacher_weight`` is given, its final hidden states ``(B, L, H_t)`` / ``(N, H_t)``.
        target, mask, objective, beta, temperature, scale_by_t2, shift, reduction,
            ignore_index, crop_vocab: as in ``token_divergence``. Cropping drops the output
            rows past the shared vocabulary range.
        student_bias: the student's output-layer bias ``(V_s,)``, if any.
        teacher_weight: the teacher's output-layer weight ``(V_t, H_t)``, if ``teacher`` holds
            hidden states.
        teacher_bias: the teacher's output-layer bias ``(V_t,)``, if any.
        chunk_size: tokens per chunk; by default :func:`default_chunk_rows`.

    Returns:
        scalar in float32 (float64 for float64 inputs). Peak extra memory: a few
        ``(chunk_size, V)`` buffers plus the gradients of hidden states and weight.
    """
    check_token_options(objective, beta, temperature, reduction)
    teacher = teacher.detach()
    student_vocab = student_weight.shape[0]
    teacher_vocab = teacher.shape[-1] if teacher_weight is None else teacher_weight.shape[0]
    size = check_vocab_sizes(student_vocab, teacher_vocab, crop_vocab)
    student_weight = student_weight[:size]
    student_bias = None if student_bias is None else student_bias[:size]
    if teacher_weight is None:
        teacher = teacher[..., :size]
    else:
        teacher_weight = teacher_weight.detach()[:size]
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()[:size]
    teacher_what = "hidden states" if teacher_weight is not None else "logits"
    check_token_layout(student_hidden.shape[:-1], teacher.shape[:-1], "hidden states", teacher_what)
    if student_hidden.shape[-1] != student_weight.shape[-1]:
        raise ValueError(
            f"Student hidden size {student_hidden.shape[-1]} does not match the output weight "
            f"{tuple(student_weight.shape)}, which must be (vocab, hidden) like nn.Linear.weight."
        )
    dtype = compute_dtype(student_hidden, student_weight, teacher)
    weights = flat_token_weights(
        student_hidden.shape[:-1], target, mask, shift, reduction, ignore_index,
        student_hidden.device, dtype,
    )  # fmt: skip
    options = _function_options(
        objective, beta, temperature, scale_by_t2, chunk_size, weights.numel(), size
    )
    return _FusedLinearTokenDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher.reshape(-1, teacher.shape[-1]),
        teacher_weight,
        teacher_bias,
        weights,
        *options,
    )


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` if it is None or a positive number of tokens; else a ``ValueError``."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            "chunk_size must be None (the default chunk) or a positive number of tokens (rows "
            f"of the flattened (N, V) logits), got {chunk_size!r}."
        )
    return chunk_size


def chunk_rows(chunk_size: int | None, tokens: int, vocab: int) -> int:
    """Tokens per chunk: ``chunk_size`` checked, or :func:`default_chunk_rows` when None."""
    if check_chunk_size(chunk_size) is None:
        return default_chunk_rows(tokens, vocab)
    return chunk_size
