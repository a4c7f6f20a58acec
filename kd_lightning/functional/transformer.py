r"""Transformer feature losses: hidden states and attention maps, padding masked out.

The stateless cores of :mod:`kd_lightning.losses.transformer`. Shapes: hidden states
``(B, L, D)``; attention maps ``(B, H, L, L)`` (query rows, key columns: what a Hugging Face
attention module returns as its attention weights); the attention ``mask`` ``(B, L)`` (1 real
token, 0 padding; ``None``: every token is real). With :math:`m_{b,t}` the mask:

- :func:`hidden_state_mse` (TinyBERT, Jiao et al. 2020, eq. 8 with :math:`W_h` applied by the
  caller): :math:`\frac{1}{D \sum m} \sum_{b,t} m_{b,t} \lVert h^S_{b,t} - h^T_{b,t} \rVert^2`,
  the mean squared error over the real tokens' features.
- :func:`hidden_state_cosine` (DistilBERT, Sanh et al. 2019, the cosine embedding loss):
  :math:`\frac{1}{\sum m} \sum_{b,t} m_{b,t} \big(1 - \cos(h^S_{b,t}, h^T_{b,t})\big)`.
- :func:`attention_map_loss` (TinyBERT eq. 7, ``"mse"``; MiniLM, Wang et al. 2020, eq. 3,
  ``"kl"``), over the real query rows i and real key columns j of every head h:
  ``"mse"``: :math:`\frac{1}{H \sum_b n_b^2} \sum_{b,h,i,j} m_{b,i} m_{b,j} (A^S - A^T)^2`
  with :math:`n_b = \sum_t m_{b,t}`; ``"kl"``: :math:`\frac{1}{H \sum m} \sum_{b,h,i} m_{b,i}
  \sum_j m_{b,j} A^T_{bhij} \log(A^T_{bhij} / A^S_{bhij})`.

TinyBERT fits the attention *scores* before the softmax; Hugging Face modules return the
probabilities after it, which is what these losses compare (TinyBERT reports both work, the
scores converging faster; MiniLM compares the probabilities). A student whose attention
dropout is on returns dropped-out maps in training mode: set its attention dropout to 0 for
attention losses. For the KL the student's zero probabilities are clamped to the smallest
normal float (finite loss); the teacher's zeros contribute 0 (0 log 0 = 0).

Layer maps: every core also takes lists (student layer i <- teacher layer j, pair by pair) and
returns the *sum* over pairs, as TinyBERT sums its layer losses. Reduction: the means above,
over the whole batch; a batch with no real token gives 0. Computed in float32 for 16-bit
inputs (float64 stays float64); the teacher is detached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import full_precision, upcast
from kd_lightning.functional.token import TOKEN_IGNORE_INDEX, token_weights

DIVERGENCES = ("mse", "kl")

Tensors = torch.Tensor | Sequence[torch.Tensor]


def _pairs(
    student: Tensors, teacher: Tensors, loss: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    single = isinstance(student, torch.Tensor)
    if single != isinstance(teacher, torch.Tensor):
        raise ValueError(
            f"{loss}: give one tensor on each side or one list on each side (a layer map), got "
            f"a {type(student).__name__} and a {type(teacher).__name__}"
        )
    if single:
        return [(student, teacher)]
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"{loss}: the layer map pairs student layer i with teacher layer i; got "
            f"{len(student)} student and {len(teacher)} teacher layers (give lists of one length)"
        )
    return list(zip(student, teacher, strict=True))


def _check(student: torch.Tensor, teacher: torch.Tensor, loss: str, layout: str, fix: str) -> None:
    rank = layout.count(",") + 1
    if student.dim() != rank or tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(
            f"{loss}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
            f"both be {layout} of one shape. {fix}"
        )


def _mask(mask: torch.Tensor | None, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` float mask in ``like``'s dtype (all ones when ``None``)."""
    if mask is None:
        return torch.ones(batch, length, dtype=like.dtype, device=like.device)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"the attention mask must be (B, L) = {(batch, length)}, got {tuple(mask.shape)}"
        )
    return (mask != 0).to(like.dtype)


def _keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` where ``keep`` (broadcast), else 0: selection, so dropped entries (inf or NaN
    included) change neither the value nor any gradient."""
    return torch.where(keep > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sum_pairs(
    student: Tensors, teacher: Tensors, loss: str, one: Callable[..., torch.Tensor]
) -> torch.Tensor:
    pairs = _pairs(student, teacher, loss)
    with full_precision(pairs[0][0]):
        return sum(one(upcast(s), upcast(t.detach())) for s, t in pairs)


_HIDDEN_FIX = (
    "Hidden states must have the teacher's width: give the loss student_dim and teacher_dim "
    "(a learned projection) or put a LinearConnector on the term, and hook layers of inputs "
    "of one length."
)


def hidden_state_mse(
    student: Tensors, teacher: Tensors, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked mean squared error of hidden states ``(B, L, D)`` (see the module docstring)."""

    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check(s, t, "hidden-state MSE", "(B, L, D)", _HIDDEN_FIX)
        m = _mask(mask, s.shape[0], s.shape[1], s)
        s, t = _keep(s, m[..., None]), _keep(t, m[..., None])
        return (s - t).pow(2).sum() / (m.sum().clamp_min(1) * s.shape[-1])

    return _sum_pairs(student, teacher, "hidden-state MSE", one)


def hidden_state_cosine(
    student: Tensors, teacher: Tensors, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked mean of ``1 - cos`` between hidden states ``(B, L, D)`` (module docstring)."""

    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check(s, t, "hidden-state cosine", "(B, L, D)", _HIDDEN_FIX)
        m = _mask(mask, s.shape[0], s.shape[1], s)
        s, t = _keep(s, m[..., None]), _keep(t, m[..., None])
        distance = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        return (distance * m).sum() / m.sum().clamp_min(1)

    return _sum_pairs(student, teacher, "hidden-state cosine", one)


def attention_map_loss(
    student: Tensors,
    teacher: Tensors,
    mask: torch.Tensor | None = None,
    divergence: str = "mse",
) -> torch.Tensor:
    """Masked MSE or KL between attention maps ``(B, H, L, L)`` (module docstring).

    Raises:
        ValueError: an unknown ``divergence``, or maps of other shapes (the number of heads
            and the sequence length must agree: heads are compared one by one).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")

    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check(
            s, t, "attention-map loss", "(B, H, L, L)",
            "Maps are compared head by head: student and teacher need the same number of "
            "heads (and the same input); hook ':output.1' of an attention module built with "
            "attn_implementation='eager'.",
        )  # fmt: skip
        batch, heads, length = s.shape[0], s.shape[1], s.shape[2]
        m = _mask(mask, batch, length, s)
        pairs = (m[:, :, None] * m[:, None, :])[:, None]  # (B, 1, L, L): real query and key
        s, t = _keep(s, pairs), _keep(t, pairs)
        if divergence == "mse":
            return ((s - t).pow(2) * pairs).sum() / (heads * pairs.sum().clamp_min(1))
        tiny = torch.finfo(s.dtype).tiny
        log_ratio = torch.where(t > 0, t.clamp_min(tiny).log() - s.clamp_min(tiny).log(), 0.0)
        rows = (t * log_ratio * pairs).sum(dim=-1)  # (B, H, L) per query row
        return (rows * m[:, None]).sum() / (heads * m.sum().clamp_min(1))

    return _sum_pairs(student, teacher, "attention-map loss", one)


def token_cross_entropy(
    student: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift: bool = True,
    reduction: str = "token",
    ignore_index: int = TOKEN_IGNORE_INDEX,
) -> torch.Tensor:
    r"""Next-token (or per-token) cross-entropy :math:`-\sum_{b,t} w_{b,t} \log q_{b,t}(y)`.

    The language-modelling loss on the labels, with the token weights :math:`w` of
    :func:`kd_lightning.functional.token.token_weights` (the same kept tokens and reductions as
    the token distillation losses): with ``shift=True`` position t is scored on label t+1.

    Args:
        student: logits ``(B, L, V)`` (or ``(N, V)`` with ``shift=False``).
        target: labels ``(B, L)``; ``ignore_index`` marks ignored tokens.
        mask: attention mask ``(B, L)``; 0 marks padding.
        shift: causal-LM alignment (labels = input ids, as Hugging Face).
        reduction: ``"token"`` or ``"sequence"``.
        ignore_index: the label of ignored tokens.
    """
    if student.dim() - 1 != target.dim() or tuple(student.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"token cross-entropy: logits {tuple(student.shape)} need labels of shape "
            f"{tuple(student.shape[:-1])}, got {tuple(target.shape)}"
        )
    logits = upcast(student)
    weights = token_weights(
        tuple(target.shape), target, mask, shift=shift, reduction=reduction,
        ignore_index=ignore_index, device=student.device, dtype=logits.dtype,
    )  # fmt: skip
    labels = target
    if shift:  # position t predicts label t+1; the last position predicts nothing
        labels = torch.cat([target[:, 1:], torch.full_like(target[:, :1], ignore_index)], 1)
    safe = torch.where(labels == ignore_index, 0, labels).clamp_min(0)
    with full_precision(logits):
        log_q = F.log_softmax(logits, dim=-1)
        picked = log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        return -(picked * weights).sum()
