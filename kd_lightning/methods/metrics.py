"""Metrics as a base service: accuracy of the student (and of any named source), agreement and
KL between student and teacher, computed from the step's knowledge.

Logits may be ``(B, C)`` or per token ``(B, L, V)``; tokens whose target is negative (``-1``
unlabeled, ``-100`` masked) or whose attention mask is 0 are left out of the accuracy, and of
agreement and KL when a target mask exists for tokens. Per-token logits also get
``<stage>/perplexity`` (exp of the student's mean token cross-entropy). When the objective's
token losses shift (``shift=True``: causal LMs, labels = input ids), logits at position t are
scored on the target at t+1, as the losses do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from kd_lightning.metrics import TeacherStudentKL, TopOneAgreement

STAGES = ("train", "val", "test")


def flatten_tokens(
    logits: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, L, V)`` logits and ``(B, L)`` targets as ``(N, V)`` and ``(N,)``; ``(B, C)`` unchanged."""
    if logits.dim() <= 2:
        return logits, target
    flat = logits.reshape(-1, logits.shape[-1])
    return flat, None if target is None else target.reshape(-1)


def token_shift(module: Any) -> bool:
    """Whether per-token targets are next-token labels: a loss of the objective says ``shift``."""
    objective = getattr(module, "objective", None)
    return any(bool(getattr(term.loss, "shift", False)) for term in objective or [])


def align_tokens(
    logits: torch.Tensor, target: torch.Tensor | None, batch: dict[str, Any], shift: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logits and targets aligned for scoring: padding (attention mask 0) becomes
    -100, and with ``shift`` position t is paired with target t+1 (the last position dropped)."""
    if logits.dim() != 3 or target is None or target.dim() != 2:
        return logits, target
    inputs = batch.get("input")
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is not None and mask.shape == target.shape:
        target = target.masked_fill(mask == 0, -100)
    if shift:
        return logits[:, :-1], target[:, 1:]
    return logits, target


class KnowledgeMetrics(nn.Module):
    """Per-stage metrics built once the class count is known (at the start-up check)."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    def configure(self, module: Any, num_classes: int) -> None:
        if self.ready:
            return
        names = ["acc", *[f"acc_{n}" for n in module.metric_sources()]]
        accuracy = {
            n: MulticlassAccuracy(num_classes, average="micro", ignore_index=-1) for n in names
        }
        student = MetricCollection(accuracy)
        teacher = MetricCollection({"agreement": TopOneAgreement(), "kl": TeacherStudentKL()})
        # ModuleDict keys cannot be "train" (an nn.Module method), hence the "_metrics" suffix.
        self.student = nn.ModuleDict(
            {f"{s}_metrics": student.clone(prefix=f"{s}/") for s in STAGES}
        )
        self.teacher = nn.ModuleDict(
            {f"{s}_metrics": teacher.clone(prefix=f"{s}/") for s in STAGES}
        )
        self.perplexity = nn.ModuleDict(
            {f"{s}_metrics": Perplexity(ignore_index=-100) for s in STAGES}
        )
        self.to(module.device)
        self.ready = True

    def update(
        self, module: Any, stage: str, knowledge: dict[str, Any], batch: dict[str, Any]
    ) -> None:
        if not self.ready:
            return
        raw_target = batch.get("target")
        shift = token_shift(module)
        student_name = module.exported_name
        collection = self.student[f"{stage}_metrics"]
        if raw_target is not None:
            for name, metric in collection.items(keep_base=True):
                source = student_name if name == "acc" else name.removeprefix("acc_")
                logits = knowledge.get(source)
                if logits is None:
                    continue
                logits, target = align_tokens(logits.detach(), raw_target, batch, shift)
                flat, flat_target = flatten_tokens(logits, target)
                metric.update(flat, flat_target.masked_fill(flat_target < 0, -1))
                module.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True,
                           prog_bar=name == "acc")  # fmt: skip
                if name == "acc" and logits.dim() == 3 and target.dim() == 2:
                    perplexity = self.perplexity[f"{stage}_metrics"]
                    perplexity.update(logits.float(), target.masked_fill(target < 0, -100))
                    module.log(f"{stage}/perplexity", perplexity, on_step=False, on_epoch=True)
        student, teacher = knowledge.get(student_name), knowledge.get("teacher")
        if student is not None and isinstance(teacher, torch.Tensor):
            s, t = student.detach(), teacher.detach()
            if s.dim() == 3:  # per token: only the tokens that carry a target
                vocab = min(s.shape[-1], t.shape[-1])  # crop_vocab: the shared range only
                s, target = align_tokens(s[..., :vocab], raw_target, batch, shift)
                t, _ = align_tokens(t[..., :vocab], raw_target, batch, shift)
                s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
                if target is not None:
                    keep = target.reshape(-1) >= 0
                    s, t = s[keep], t[keep]
            metrics = self.teacher[f"{stage}_metrics"]
            metrics.update(s, t)
            module.log_dict(metrics, on_step=False, on_epoch=True)
