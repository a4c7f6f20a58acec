"""Transfer sets (LightningDataModules whose batches are dicts: input, target, index)."""

from kd_lightning.data.cifar import CIFAR10TransferSet, CIFAR100TransferSet, ImageTransferSet
from kd_lightning.data.digits import DigitsTransferSet
from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.data.synthetic import SyntheticTransferSet
from kd_lightning.data.teacher_cache import InvalidCacheFile, TeacherCache, TeacherCacheError
from kd_lightning.data.transfer_set import (
    EpochSeededSampler,
    TensorTransferSet,
    TransferSetDataModule,
)

__all__ = [
    "CIFAR10TransferSet",
    "CIFAR100TransferSet",
    "DigitsTransferSet",
    "EpochSeededSampler",
    "ImageTransferSet",
    "InvalidCacheFile",
    "SynthesisedTransferSet",
    "SyntheticTransferSet",
    "TeacherCache",
    "TeacherCacheError",
    "TensorTransferSet",
    "TransferSetDataModule",
]
