"""kd_lightning: knowledge distillation on PyTorch Lightning.

Methods decide who teaches whom (:mod:`kd_lightning.methods`), losses how knowledge is compared
(:mod:`kd_lightning.losses`), transfer sets what the student learns from
(:mod:`kd_lightning.data`), and Lightning where it runs.
"""

from kd_lightning.data import DigitsTransferSet, TransferSetDataModule
from kd_lightning.features import FeatureCapture
from kd_lightning.methods import (
    DistillationModule,
    LossTerm,
    OfflineDistillation,
    Supervised,
)
from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher, load_student

__version__ = "0.1.0"

__all__ = [
    "DigitsTransferSet",
    "DistillationModule",
    "FeatureCapture",
    "FrozenTeacher",
    "LossTerm",
    "OfflineDistillation",
    "PretrainedTeacher",
    "Supervised",
    "TransferSetDataModule",
    "load_student",
]
