"""LightningModules: who teaches whom. All share :class:`DistillationModule`."""

from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.methods.offline import BornAgain, OfflineDistillation, hinton_loss_terms
from kd_lightning.methods.on_policy import OnPolicyDistillation  # noqa: F401 (see the end)
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
    "PSKD",
    "ProgressiveDistillation",
    "Supervised",
    "default_optimizer",
    "hinton_loss_terms",
]
# OnPolicyDistillation is importable here but not in __all__: tests/bench/test_preflight_every_
# method.py runs every __all__ method on the digits data, which a causal-LM-only method cannot.
