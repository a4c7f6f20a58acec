"""Cross-entropy with the teacher's top-1 class as the label (a hard pseudo-label).

.. math:: \\mathcal{L} = \\frac{1}{B} \\sum_i -\\log \\mathrm{softmax}(z_i)_{\\arg\\max_c v_{ic}}

Used when the transfer set has no labels of its own (data-free distillation: Nayak et al. 2019
add it beside the soft targets). Shapes: student ``z`` and teacher ``v`` logits ``(B, C)``;
mean over the batch; the teacher only picks the label (no gradient to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.spec import records_init_args


@records_init_args
class TeacherTopOneCrossEntropy(nn.Module):
    """``CE(student, argmax(teacher))`` averaged over the batch (see the module docstring)."""

    def forward(
        self, *, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"student logits {tuple(student.shape)} and teacher logits "
                f"{tuple(teacher.shape)} must have the same shape"
            )
        logits = student if student.dtype == torch.float64 else student.float()
        return F.cross_entropy(logits, teacher.detach().argmax(dim=-1))
