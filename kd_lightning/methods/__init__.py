"""LightningModules: who teaches whom. All share :class:`DistillationModule`."""

from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.methods.loss_term import LossTerm
from kd_lightning.methods.offline import (
    BornAgain,
    OfflineDistillation,
    PermutedTeacher,
    hinton_loss_terms,
)
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.methods.self_distillation import (
    CSKD,
    PSKD,
    BranchSelfDistillation,
    EMATeacher,
    MeanTeacherDistillation,
)
from kd_lightning.methods.supervised import Supervised

__all__ = [
    "CSKD",
    "PSKD",
    "BornAgain",
    "BranchSelfDistillation",
    "DataFreeDistillation",
    "DistillationModule",
    "EMATeacher",
    "LossTerm",
    "MeanTeacherDistillation",
    "MutualDistillation",
    "OfflineDistillation",
    "PermutedTeacher",
    "ProgressiveDistillation",
    "Supervised",
    "hinton_loss_terms",
]
