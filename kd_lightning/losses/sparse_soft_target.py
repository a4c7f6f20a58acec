"""Soft-target distillation from a sparse (top-k) teacher, e.g. a teacher-output cache that keeps
only the k most probable classes per sample. The equation and why the tail is one bucket: see
:mod:`kd_lightning.functional.sparse_soft_target`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl
from kd_lightning.models.spec import records_init_args
from kd_lightning.validation import positive


@records_init_args
class SparseSoftTargetKLLoss(nn.Module):
    """``T^2 * KL`` over the teacher's top-k classes plus one bucket holding the rest of the mass.

    Equals :class:`~kd_lightning.losses.SoftTargetKLLoss` when k is the number of classes. The
    teacher's knowledge is the pair ``(values, indices)``: log-probabilities at this loss's
    temperature and their classes, as a :class:`~kd_lightning.data.teacher_cache.TeacherCache`
    with ``topk`` stores them (build the cache with the same ``temperature``). In an
    :class:`~kd_lightning.methods.OfflineDistillation` objective use ``LossTerm(loss, teacher="topk")``.

    Args:
        temperature: softening temperature T > 0; must be the one the values were computed at.
        scale_by_t2: multiply by T^2 so the gradient scale does not depend on T.
    """

    uses_teacher = True

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        self.temperature = positive("temperature", temperature, "Use e.g. temperature: 4.0")
        self.scale_by_t2 = scale_by_t2

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: Sequence[torch.Tensor],
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(teacher, torch.Tensor) or len(teacher) != 2:
            raise TypeError(
                "SparseSoftTargetKLLoss needs the teacher's top-k knowledge as (values, indices); "
                "got dense logits. Attach a TeacherCache with topk to the data and set the loss "
                "term's `teacher: topk`, or use SoftTargetKLLoss for dense logits."
            )
        values, indices = teacher
        return sparse_soft_target_kl(student, values, indices, self.temperature, self.scale_by_t2)
