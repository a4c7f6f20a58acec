"""Teacher-student metrics: top-1 agreement and KL(teacher || student).

Both accumulate sums on the device (no host sync per step) and reduce across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class TopOneAgreement(Metric):
    """Fraction of samples where the student's top-1 class equals the teacher's (fidelity, Stanton et al. 2021)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self.agree += (student.argmax(-1) == teacher.argmax(-1)).sum()
        self.total += student.shape[0]

    def compute(self) -> torch.Tensor:
        return self.agree / self.total.clamp_min(1)


class TeacherStudentKL(Metric):
    """Mean ``KL(softmax(teacher) || softmax(student))`` per sample at temperature 1, in nats."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.add_state("kl_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        log_q = F.log_softmax(student.float() / self.temperature, dim=-1)
        log_p = F.log_softmax(teacher.float() / self.temperature, dim=-1)
        self.kl_sum += (log_p.exp() * (log_p - log_q)).sum()
        self.total += student.shape[0]

    def compute(self) -> torch.Tensor:
        return self.kl_sum / self.total.clamp_min(1)
