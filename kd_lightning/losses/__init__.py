"""Loss modules (pure torch, never imports lightning).

Contract: ``forward(*, student, teacher, target=None)``, keyword-only, student first, a scalar
out; softmax in float32 (float64 stays float64); a teacher logit of ``-inf`` is a probability
of 0; student and teacher shapes are checked; the teacher is detached. Weights and warm-up live in
:class:`kd_lightning.methods.LossTerm`.
"""

from kd_lightning.losses.contrastive import CRDLoss
from kd_lightning.losses.feature import (
    AttentionTransferLoss,
    FitNetsHintLoss,
    FSPLoss,
    NSTLoss,
    VIDLoss,
)
from kd_lightning.losses.relation import (
    CorrelationCongruenceLoss,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)
from kd_lightning.losses.response import DISTLoss, DKDLoss, LogitStandardizationKDLoss
from kd_lightning.losses.soft_target import (
    HardLabelCrossEntropy,
    LogitMatchingMSELoss,
    SoftTargetKLLoss,
)
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss
from kd_lightning.losses.token import (
    FusedLinearTokenDistillationLoss,
    TokenDistillationLoss,
    TokenForwardKLLoss,
    TokenGeneralizedJSDLoss,
    TokenReverseKLLoss,
    TokenTotalVariationLoss,
)
from kd_lightning.losses.token_sparse import SparseTokenDistillationLoss
from kd_lightning.losses.transformer import (
    AttentionMapLoss,
    HiddenStateCosineLoss,
    HiddenStateMSELoss,
    TokenCrossEntropyLoss,
)

__all__ = [
    "AttentionMapLoss",
    "AttentionTransferLoss",
    "CRDLoss",
    "CorrelationCongruenceLoss",
    "DISTLoss",
    "DKDLoss",
    "FSPLoss",
    "FitNetsHintLoss",
    "FusedLinearTokenDistillationLoss",
    "HardLabelCrossEntropy",
    "HiddenStateCosineLoss",
    "HiddenStateMSELoss",
    "LogitMatchingMSELoss",
    "LogitStandardizationKDLoss",
    "NSTLoss",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "SoftTargetKLLoss",
    "SparseSoftTargetKLLoss",
    "SparseTokenDistillationLoss",
    "TokenCrossEntropyLoss",
    "TokenDistillationLoss",
    "TokenForwardKLLoss",
    "TokenGeneralizedJSDLoss",
    "TokenReverseKLLoss",
    "TokenTotalVariationLoss",
    "VIDLoss",
]
