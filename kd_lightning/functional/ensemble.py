r"""Several teachers as one: per-sample teacher weights and knowledge purification (stateless).

Multi-teacher distillation gives the student one combined target built from K teachers. The
simplest combination averages them (You et al. 2017, "Learning from Multiple Teacher Networks");
confidence-aware variants weigh each teacher per sample by how sure (or how right) it is
(e.g. CA-MKD, Zhang et al. 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation").
*Knowledge purification* goes one step further: a teacher whose prediction on a sample is wrong
(the label is known) or unsure (high entropy, small top-1/top-2 margin) is removed from (or
down-weighted in) that sample's combination, so a bad teacher cannot pull the student away from
the others.

Shapes: teacher logits are stacked as ``(K, B, C)`` (teachers, batch, classes); weights and
masks are ``(K, B)``. Everything runs in float32 (float64 for float64 logits), without host
synchronisation (no data-dependent indexing), so it can sit inside a training step on any
device. A teacher logit of ``-inf`` (a masked class) is a probability of 0 everywhere here:
entropies treat :math:`0 \log 0` as 0, and a teacher with weight 0 contributes nothing, not
``0 * -inf = NaN``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_lightning.functional._divergence import entropy_from_log_probs
from kd_lightning.functional._precision import upcast
from kd_lightning.functional.soft_target import IGNORE_INDEX

WEIGHTINGS = ("mean", "fixed", "confidence", "entropy")
PURIFY_MODES = ("none", "wrong", "unsure", "both")
COMBINE_SPACES = ("logits", "probabilities")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_stacked(logits: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(
            f"teacher logits must be stacked as (K, B, C) (teachers, samples, classes), got "
            f"{tuple(logits.shape)}. Stack the K teachers' (B, C) logits with torch.stack; "
            "per-token logits (B, L, V) must be flattened to (B * L, V) first."
        )


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Entropy of ``softmax(logits)`` over the last dim, divided by ``log C``: a value in [0, 1].

    .. math:: \tilde H(p) = -\frac{1}{\log C} \sum_c p_c \log p_c

    0 for a one-hot prediction, 1 for the uniform one, whatever the number of classes C.
    """
    entropy = entropy_from_log_probs(F.log_softmax(upcast(logits), dim=-1))
    return entropy / math.log(logits.shape[-1])


def top_margin(logits: torch.Tensor) -> torch.Tensor:
    """``p_top1 - p_top2`` of ``softmax(logits)`` over the last dim, in [0, 1]."""
    top2 = F.softmax(upcast(logits), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def teacher_weights(
    logits: torch.Tensor, weighting: str = "mean", fixed_weights: Sequence[float] | None = None
) -> torch.Tensor:
    r"""Per-sample weights of K teachers, ``(K, B)``, summing to 1 over the teachers.

    - ``"mean"``: :math:`w_k = 1/K`.
    - ``"fixed"``: :math:`w_k = a_k / \sum_j a_j` with the given ``fixed_weights`` :math:`a`.
    - ``"confidence"``: :math:`w_{k,b} \propto \max_c p_{k,b,c}` (each teacher's top-1
      probability on that sample).
    - ``"entropy"``: :math:`w_{k,b} = \mathrm{softmax}_k(-H(p_{k,b}))` with the entropy H in nats.

    Args:
        logits: teacher logits ``(K, B, C)``.
        weighting: one of ``"mean" | "fixed" | "confidence" | "entropy"``.
        fixed_weights: K non-negative numbers (not all 0), for ``"fixed"``.
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_stacked(logits)
    logits = upcast(logits)
    k, b = logits.shape[0], logits.shape[1]
    if weighting == "mean":
        return logits.new_full((k, b), 1.0 / k)
    if weighting == "fixed":
        if fixed_weights is None or len(fixed_weights) != k:
            raise ValueError(
                f"fixed weighting needs one weight per teacher: {k} teachers, got "
                f"{None if fixed_weights is None else len(fixed_weights)} weights"
            )
        w = torch.as_tensor(fixed_weights, dtype=logits.dtype, device=logits.device)
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"fixed teacher weights must be >= 0 and not all 0, got {w.tolist()}")
        return (w / w.sum()).unsqueeze(1).expand(k, b).clone()
    log_probs = F.log_softmax(logits, dim=-1)
    if weighting == "confidence":
        confidence = log_probs.exp().amax(dim=-1)
        return confidence / confidence.sum(dim=0, keepdim=True)
    return F.softmax(-entropy_from_log_probs(log_probs), dim=0)


def purification_mask(
    logits: torch.Tensor,
    target: torch.Tensor | None = None,
    purify: str = "both",
    max_entropy: float | None = None,
    min_margin: float | None = None,
) -> torch.Tensor:
    """Which teacher's knowledge to keep on which sample: a bool ``(K, B)`` mask.

    - ``"wrong"``: drop teacher k on sample b when its top-1 class differs from the label.
      Unlabeled samples (``target == -1``, or no target) are never judged wrong.
    - ``"unsure"``: drop it when its normalised entropy (:func:`normalized_entropy`, in [0, 1])
      is above ``max_entropy``, or its top-1/top-2 probability margin is below ``min_margin``
      (each criterion is used when its threshold is given).
    - ``"both"``: either reason drops it. ``"none"``: keep everything.
    """
    _check_choice("purify", purify, PURIFY_MODES)
    _check_stacked(logits)
    keep = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if purify in ("wrong", "both") and target is not None:
        wrong = (logits.argmax(dim=-1) != target.unsqueeze(0)) & (target != IGNORE_INDEX)
        keep &= ~wrong
    if purify in ("unsure", "both"):
        if max_entropy is not None:
            keep &= normalized_entropy(logits) <= max_entropy
        if min_margin is not None:
            keep &= top_margin(logits) >= min_margin
    return keep


def combine_teachers(
    logits: torch.Tensor, weights: torch.Tensor, space: str = "logits"
) -> torch.Tensor:
    r"""One set of logits ``(B, C)`` from K teachers' logits ``(K, B, C)`` and weights ``(K, B)``.

    - ``"logits"``: :math:`v_b = \sum_k w_{k,b} v_{k,b}`, the weighted mean of the logits. A
      loss at temperature T then softens the mixture as it would a single teacher.
    - ``"probabilities"``: :math:`v_b = \log \sum_k w_{k,b}\, \mathrm{softmax}(v_{k,b})`, the log
      of the mixed distribution: at T = 1 a KL to it is exactly the KL to the mixture of the
      teachers' predictions (at T != 1 the loss softens the mixture, not each teacher).

    The weights are used as given (rows are not renormalised here).

    ``-inf`` logits (masked classes): a teacher of weight 0 contributes nothing (never
    ``0 * -inf``). In ``"logits"`` space a class that any teacher of positive weight masks is
    ``-inf`` in the mixture (a weighted geometric mean of the distributions gives it 0); in
    ``"probabilities"`` space it is ``-inf`` only where every teacher of positive weight
    gives it probability 0 (the log of an exact 0 is ``-inf``, a probability of 0 downstream).
    """
    _check_choice("space", space, COMBINE_SPACES)
    _check_stacked(logits)
    if weights.shape != logits.shape[:2]:
        raise ValueError(
            f"teacher weights {tuple(weights.shape)} must be (K, B) for teacher logits "
            f"{tuple(logits.shape)} (K teachers, B samples)."
        )
    logits = upcast(logits)
    w = upcast(weights).unsqueeze(-1)
    if space == "logits":
        return torch.where(w != 0, w * logits, 0.0).sum(dim=0)
    return (w * F.softmax(logits, dim=-1)).sum(dim=0).log()


def ensemble_teacher_logits(
    logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    weighting: str = "mean",
    fixed_weights: Sequence[float] | None = None,
    purify: str = "none",
    max_entropy: float | None = None,
    min_margin: float | None = None,
    purify_weight: float = 0.0,
    space: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight, purify and combine K teachers.

    A flagged teacher's weight is multiplied by ``purify_weight`` (0 drops it); the weights of
    each sample are then renormalised to sum to 1 over the teachers.

    Returns:
        ``(combined, covered, keep)``: combined logits ``(B, C)``; ``covered`` ``(B,)`` is False
        where every teacher was flagged (the caller decides the fallback: the combined row is
        then the unpurified combination); ``keep`` is the ``(K, B)`` mask.
    """
    if not 0 <= purify_weight <= 1:
        raise ValueError(f"purify_weight must be in [0, 1], got {purify_weight}")
    weights = teacher_weights(logits, weighting, fixed_weights)
    keep = purification_mask(logits, target, purify, max_entropy, min_margin)
    covered = keep.any(dim=0)
    purified = weights * torch.where(keep, 1.0, purify_weight)
    total = purified.sum(dim=0, keepdim=True)
    # Uncovered samples keep the unpurified weights (no division by zero, no host sync).
    purified = torch.where(covered & (total > 0), purified / total.clamp_min(1e-12), weights)
    return combine_teachers(logits, purified, space), covered, keep
