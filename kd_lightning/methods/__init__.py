"""LightningModules: who teaches whom. All share :class:`DistillationModule`."""

from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.methods.offline import BornAgain, OfflineDistillation, hinton_loss_terms
from kd_lightning.methods.on_policy import OnPolicyDistillation
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.methods.self_distillation import BranchSelfDistillation, MeanTeacherDistillation
from kd_lightning.methods.self_knowledge import CSKD, PSKD
from kd_lightning.methods.supervised import Supervised
from kd_lightning.objective import LossTerm

__all__ = [
    "BornAgain",
    "BranchSelfDistillation",
    "CSKD",
    "DataFreeDistillation",
    "DistillationModule",
    "LossTerm",
    "MeanTeacherDistillation",
    "MutualDistillation",
    "OfflineDistillation",
    "OnPolicyDistillation",
    "PSKD",
    "ProgressiveDistillation",
    "Supervised",
    "default_optimizer",
    "hinton_loss_terms",
]
