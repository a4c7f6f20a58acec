"""Metrics as a base service: accuracy of the student (and of any named source), agreement and
KL between student and teacher, computed from the step's knowledge.

Logits may be ``(B, C)`` or per token ``(B, L, V)``; tokens whose target is negative (``-1``
unlabeled, ``-100`` masked) are left out of the accuracy, and of agreement and KL when a target
mask exists for tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

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
        self.to(module.device)
        self.ready = True

    def update(
        self, module: Any, stage: str, knowledge: dict[str, Any], batch: dict[str, Any]
    ) -> None:
        if not self.ready:
            return
        target = batch.get("target")
        student_name = module.exported_name
        collection = self.student[f"{stage}_metrics"]
        if target is not None:
            for name, metric in collection.items(keep_base=True):
                source = student_name if name == "acc" else name.removeprefix("acc_")
                logits = knowledge.get(source)
                if logits is None:
                    continue
                flat, flat_target = flatten_tokens(logits.detach(), target)
                metric.update(flat, flat_target.masked_fill(flat_target < 0, -1))
                module.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True,
                           prog_bar=name == "acc")  # fmt: skip
        student, teacher = knowledge.get(student_name), knowledge.get("teacher")
        if student is not None and isinstance(teacher, torch.Tensor):
            s, t = student.detach(), teacher.detach()
            if s.dim() == 3:  # per token: only the tokens that carry a target
                s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
                if target is not None:
                    keep = target.reshape(-1) >= 0
                    s, t = s[keep], t[keep]
            metrics = self.teacher[f"{stage}_metrics"]
            metrics.update(s, t)
            module.log_dict(metrics, on_step=False, on_epoch=True)
