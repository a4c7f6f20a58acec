"""One shape check for every pairwise loss: a mismatch is an error naming both shapes and the fix.

Broadcasting would otherwise turn a teacher shaped ``(B, 1, C)`` against a student's ``(B, C)``
into a ``(B, B, C)`` comparison and a plausible-looking number. Every core that compares a
student tensor with a teacher tensor calls one of these before computing anything.
"""

from __future__ import annotations

import torch

LOGITS_FIX = (
    "Both must be logits over the same classes, (B, C) or (B, L, V) alike: squeeze or reshape "
    "the side with the extra dimension (e.g. teacher.squeeze(1) for (B, 1, C)), or build the "
    "teacher and the student for the same number of classes."
)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_same_shape(
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss: str,
    *,
    what: str = "logits",
    layout: str = "(..., C)",
    fix: str = LOGITS_FIX,
    min_dim: int = 1,
    max_dim: int | None = None,
) -> None:
    """Raise ``ValueError`` unless student and teacher have one shape, of an allowed rank.

    Args:
        student: the student tensor.
        teacher: the teacher tensor.
        loss: the loss's name, first in the message.
        what: what the tensors are (``"logits"``, ``"features"``).
        layout: the documented shape, e.g. ``"(B, C)"``.
        fix: the sentence telling the user what to change.
        min_dim: smallest allowed rank.
        max_dim: largest allowed rank (``None``: no limit).
    """
    rank_ok = student.dim() >= min_dim and (max_dim is None or student.dim() <= max_dim)
    if student.shape != teacher.shape or not rank_ok:
        raise ValueError(
            f"{loss}: student {what} {_shape(student)} and teacher {what} {_shape(teacher)} "
            f"must have one and the same shape {layout}. {fix}"
        )


def check_same_batch(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> None:
    """Raise ``ValueError`` unless both are ``(B, ...)`` with the same ``B`` (relation losses)."""
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss} compares relations inside one batch: student {_shape(student)} and "
            f"teacher {_shape(teacher)} must be (B, ...) with the same B (their other "
            "dimensions may differ). Pass features of the same batch, with a batch dimension."
        )


def check_topk_pair(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    loss: str,
    *,
    names: str,
    source: str,
    layout: str,
) -> int:
    """Raise ``ValueError`` unless ``(values, indices)`` is one top-k pair laid out like ``student``.

    Sparse teacher knowledge is ``(values, indices)``, both ``(..., k)``, against student logits
    ``(..., C)``: every dimension but the last must agree. Returns k.

    Args:
        student: the student logits.
        values: the teacher's top-k log-probabilities.
        indices: their classes.
        loss: the loss's name, first in each message.
        names: how the message names values and indices (e.g. ``"teacher_values and
            teacher_indices"``).
        source: what the pair should come from, ending the pair message (after ``"Pass the
            (values, indices) pair of one top-k "``).
        layout: what the layouts must do and the fix, ending the layout message (after
            ``"must "``).
    """
    if values.shape != indices.shape or values.dim() < 1:
        raise ValueError(
            f"{loss}: {names} must have the same shape (..., k); got {_shape(values)} and "
            f"{_shape(indices)}. Pass the (values, indices) pair of one top-k {source}"
        )
    if student.shape[:-1] != values.shape[:-1]:
        raise ValueError(
            f"{loss}: student logits {_shape(student)} and teacher top-k values "
            f"{_shape(values)} must {layout}"
        )
    return values.shape[-1]
