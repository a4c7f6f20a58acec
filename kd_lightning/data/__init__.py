"""Transfer sets (LightningDataModules whose batches are dicts: input, target, index)."""

from kd_lightning.data.digits import DigitsTransferSet
from kd_lightning.data.transfer_set import (
    EpochSeededSampler,
    TensorTransferSet,
    TransferSetDataModule,
)

__all__ = ["DigitsTransferSet", "EpochSeededSampler", "TensorTransferSet", "TransferSetDataModule"]
