"""``TeacherEnsemble``: several frozen teachers as one knowledge source.

You et al. (2017), "Learning from Multiple Teacher Networks": the teachers' outputs are combined
per sample into one set of teacher logits (mean, fixed, confidence or entropy weights) and may
be *purified*: a teacher that is wrong or unsure on a sample is dropped from that sample's
combination (see :mod:`kd_lightning.functional.ensemble` for the equations).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_lightning.functional.ensemble import (
    COMBINE_SPACES,
    PURIFY_MODES,
    WEIGHTINGS,
    ensemble_teacher_logits,
)
from kd_lightning.teachers.frozen import FrozenTeacher, call_model, output_logits

FALLBACKS = ("exclude", "label")


class TeacherEnsemble(FrozenTeacher):
    """Several frozen teachers (heterogeneous architectures allowed) combined per sample.

    Per sample, each teacher gets a weight (``weighting``), teachers flagged by ``purify`` are
    dropped (weight times ``purify_weight``), the weights are renormalised and the logits
    combined in ``combine`` space. Samples on which every teacher is flagged fall back to
    ``purify_fallback``:

    - ``"exclude"``: the sample's teacher is the student's own detached output, so every
      divergence term is 0 there with a zero gradient (hard-label terms still apply);
    - ``"label"``: the one-hot label (log-probabilities of a ``(1 - 1e-6)`` one-hot) is the
      teacher; unlabeled samples are excluded as above.

    Teacher confidence, entropy and margins are read at temperature 1. The fraction of
    (teacher, sample) pairs that purification removed is logged as ``<stage>/teacher_dropped``.
    Loss terms over hooked teacher layers need a single teacher, not an ensemble.

    Args:
        teachers: the teachers (modules, e.g. :class:`PretrainedTeacher`), at least one.
        weighting: ``"mean"``, ``"fixed"`` (``weights``), ``"confidence"`` (per-sample top-1
            probability) or ``"entropy"`` (per-sample softmax of minus the entropy).
        weights: one non-negative weight per teacher, for ``"fixed"``.
        combine: ``"logits"`` (weighted mean of logits) or ``"probabilities"`` (log of the
            weighted mixture of the teachers' softmax outputs).
        purify: ``"none"``, ``"wrong"`` (top-1 differs from the label), ``"unsure"``
            (normalised entropy above ``purify_entropy`` or top-1/top-2 margin below
            ``purify_margin``) or ``"both"``.
        purify_entropy: normalised-entropy threshold in [0, 1] for ``"unsure"``.
        purify_margin: probability-margin threshold in [0, 1] for ``"unsure"``.
        purify_weight: factor on a flagged teacher's weight (0 drops it; 0.5 halves it).
        purify_fallback: ``"exclude"`` or ``"label"``.

    Raises:
        ValueError: an empty list, an unknown option (the valid ones are listed), weights that
            do not match the teachers, or a purification without threshold.
    """

    def __init__(
        self,
        teachers: list[nn.Module],
        weighting: str = "mean",
        weights: list[float] | None = None,
        combine: str = "logits",
        purify: str = "none",
        purify_entropy: float | None = None,
        purify_margin: float | None = None,
        purify_weight: float = 0.0,
        purify_fallback: str = "exclude",
    ) -> None:
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher in `teachers`")
        _check_options(
            len(teachers), weighting, weights, combine, purify, purify_entropy, purify_margin,
            purify_weight, purify_fallback,
        )  # fmt: skip
        members = [t if isinstance(t, FrozenTeacher) else FrozenTeacher(t) for t in teachers]
        super().__init__(nn.ModuleList(members))
        self.weighting, self.weights = weighting, list(weights) if weights else None
        self.combine = combine
        self.purify, self.purify_fallback = purify, purify_fallback
        self.purify_entropy, self.purify_margin = purify_entropy, purify_margin
        self.purify_weight = purify_weight

    @property
    def hook_root(self) -> nn.Module:
        raise ValueError(
            "loss terms read hooked teacher layers, which needs a single teacher; with a "
            "TeacherEnsemble use logit terms only (teacher: logits)"
        )

    @property
    def members(self) -> list[FrozenTeacher]:
        return list(self.module)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean-free combination without labels: every teacher's logits, stacked ``(K, ...)``."""
        with torch.no_grad():
            return torch.stack([output_logits(t(*args, **kwargs)).float() for t in self.module])

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            outputs = [output_logits(call_model(t, batch["input"])).float() for t in self.module]
        for i, out in enumerate(outputs[1:], start=1):
            if out.shape != outputs[0].shape:
                raise ValueError(
                    f"teacher {i} (teachers.{i}) outputs {out.shape[-1]} logits but teacher 0 "
                    f"outputs {outputs[0].shape[-1]}: every teacher of an ensemble must predict "
                    "the same classes"
                )
        stacked = torch.stack(outputs)
        target = batch.get("target")
        combined, covered, keep = ensemble_teacher_logits(
            stacked,
            target,
            weighting=self.weighting,
            fixed_weights=self.weights,
            purify=self.purify,
            max_entropy=self.purify_entropy,
            min_margin=self.purify_margin,
            purify_weight=self.purify_weight,
            space=self.combine,
        )
        result: dict[str, Any] = {"logits": combined}
        if self.purify == "none":
            return result
        result["log.teacher_dropped"] = (~keep).float().mean()
        uncovered = ~covered
        if self.purify_fallback == "label" and target is not None:
            labeled = target >= 0
            one_hot = torch.nn.functional.one_hot(target.clamp_min(0), combined.shape[-1])
            label_logits = (one_hot.float() * (1 - 1e-6) + 1e-6 / combined.shape[-1]).log()
            combined = torch.where((uncovered & labeled).unsqueeze(-1), label_logits, combined)
            uncovered = uncovered & ~labeled
        student = knowledge.get("student")
        if student is not None:
            combined = torch.where(uncovered.unsqueeze(-1), student.detach().float(), combined)
        result["logits"] = combined
        return result


def _check_options(
    count, weighting, weights, combine, purify, entropy, margin, factor, fallback
) -> None:
    for name, value, choices in [
        ("weighting", weighting, WEIGHTINGS),
        ("combine", combine, COMBINE_SPACES),
        ("purify", purify, PURIFY_MODES),
        ("purify_fallback", fallback, FALLBACKS),
    ]:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    if weighting == "fixed":
        if weights is None:
            raise ValueError("weighting='fixed' needs weights: one weight per teacher")
        if len(weights) != count:
            raise ValueError(
                f"weights has {len(weights)} entries but there are {count} teachers: give "
                f"exactly {count} weights (one per teacher, in order)"
            )
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be >= 0 and not all 0, got {list(weights)}")
    elif weights is not None:
        raise ValueError(
            f"weights are only used with weighting='fixed' (got {weighting!r}); remove them or "
            "set weighting: fixed"
        )
    if purify in ("unsure", "both") and entropy is None and margin is None:
        raise ValueError(
            f"purify={purify!r} needs a threshold: set purify_entropy (normalised entropy in "
            "[0, 1], e.g. 0.5) and/or purify_margin (top-1 minus top-2 probability, e.g. 0.2)"
        )
    for name, value in [("purify_entropy", entropy), ("purify_margin", margin)]:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0 <= factor <= 1:
        raise ValueError(f"purify_weight must be in [0, 1], got {factor}")
