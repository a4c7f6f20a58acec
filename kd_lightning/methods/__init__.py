"""LightningModules: who teaches whom."""

from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.loss_term import LossTerm
from kd_lightning.methods.offline import OfflineDistillation, hinton_loss_terms
from kd_lightning.methods.supervised import Supervised

__all__ = [
    "DistillationModule",
    "LossTerm",
    "OfflineDistillation",
    "Supervised",
    "hinton_loss_terms",
]
