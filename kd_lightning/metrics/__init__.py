"""torchmetrics Metrics for distillation."""

from kd_lightning.metrics.agreement import TeacherStudentKL, TopOneAgreement

__all__ = ["TeacherStudentKL", "TopOneAgreement"]
