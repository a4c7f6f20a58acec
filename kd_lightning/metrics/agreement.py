"""Teacher-student metrics: top-1 agreement and KL(teacher || student).

Both accept logits ``(B, C)`` or ``(B, L, V)`` (every row, sample or token, counts once),
check that student and teacher have one shape, accumulate sums on the device (no host sync per
step) and reduce across processes. A teacher logit of ``-inf`` (a masked class) is a
probability of 0, never a NaN.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from kd_lightning.functional._divergence import kl_from_log_probs, softened_log_probs
from kd_lightning.functional._shapes import check_same_shape


def _rows(logits: torch.Tensor) -> int:
    return logits.shape[:-1].numel()


class TopOneAgreement(Metric):
    """Fraction of rows where the student's top-1 class equals the teacher's.

    Fidelity in the sense of Stanton et al. (2021), "Does Knowledge Distillation Really Work?".
    A ``-inf`` teacher logit is never the teacher's top-1 unless the whole row is ``-inf``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        check_same_shape(student, teacher, "TopOneAgreement")
        self.agree += (student.argmax(-1) == teacher.argmax(-1)).sum()
        self.total += _rows(student)

    def compute(self) -> torch.Tensor:
        return self.agree / self.total.clamp_min(1)


class TeacherStudentKL(Metric):
    r"""Mean :math:`\mathrm{KL}(\mathrm{softmax}(v/T) \| \mathrm{softmax}(z/T))` per row, in nats.

    Temperature 1 by default (the distributions the models predict), without the
    :math:`T^2` factor of the loss. A ``-inf`` teacher logit contributes 0.

    Args:
        temperature: softening temperature T > 0.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 1.0.")
        self.temperature = float(temperature)
        self.add_state("kl_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        check_same_shape(student, teacher, "TeacherStudentKL")
        log_q = softened_log_probs(student, self.temperature)
        log_p = softened_log_probs(teacher, self.temperature)
        self.kl_sum += kl_from_log_probs(log_p, log_q).sum()
        self.total += _rows(student)

    def compute(self) -> torch.Tensor:
        return self.kl_sum / self.total.clamp_min(1)
