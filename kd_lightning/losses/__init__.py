"""Loss modules (pure torch, never imports lightning). Contract: ``forward(*, student, teacher, target=None)``."""

from kd_lightning.losses.soft_target import (
    HardLabelCrossEntropy,
    LogitMatchingMSELoss,
    SoftTargetKLLoss,
)

__all__ = ["HardLabelCrossEntropy", "LogitMatchingMSELoss", "SoftTargetKLLoss"]
