"""Transfer sets (LightningDataModules whose batches are dicts: input, target, index)."""

from kd_lightning.data.batch import (
    CACHED_OUTPUT_KEYS,
    TEACHER_LOGITS,
    TEACHER_TOPK_INDICES,
    TEACHER_TOPK_VALUES,
    check_targets,
    example_batch,
    normalise_batch,
)
from kd_lightning.data.cache_format import CacheProvenance
from kd_lightning.data.cifar import CIFAR10TransferSet, CIFAR100TransferSet, ImageTransferSet
from kd_lightning.data.dataset_transfer_set import DatasetTransferSet
from kd_lightning.data.datasets import TransferSet, select_transfer_samples
from kd_lightning.data.digits import DigitsTransferSet
from kd_lightning.data.generated_targets import (
    GeneratedSequences,
    GenerationsError,
    SequenceKDTransferSet,
    TeacherGenerations,
)
from kd_lightning.data.idx import IDXFileError
from kd_lightning.data.mnist import FashionMNISTTransferSet, MNISTTransferSet
from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.data.synthetic import SyntheticTransferSet
from kd_lightning.data.teacher_cache import InvalidCacheFile, TeacherCache, TeacherCacheError
from kd_lightning.data.text import (
    BBCNewsTransferSet,
    CausalLMTransferSet,
    TextClassificationTransferSet,
)
from kd_lightning.data.text_sources import load_tokenizer, train_tokenizer
from kd_lightning.data.transfer_set import (
    BaseTransferSetDataModule,
    EpochSeededSampler,
    TensorTransferSet,
    TransferSetDataModule,
)

__all__ = [
    "CACHED_OUTPUT_KEYS",
    "TEACHER_LOGITS",
    "TEACHER_TOPK_INDICES",
    "TEACHER_TOPK_VALUES",
    "BBCNewsTransferSet",
    "BaseTransferSetDataModule",
    "CausalLMTransferSet",
    "CacheProvenance",
    "DatasetTransferSet",
    "TransferSet",
    "check_targets",
    "load_tokenizer",
    "example_batch",
    "normalise_batch",
    "select_transfer_samples",
    "train_tokenizer",
    "CIFAR10TransferSet",
    "CIFAR100TransferSet",
    "DigitsTransferSet",
    "EpochSeededSampler",
    "FashionMNISTTransferSet",
    "GeneratedSequences",
    "GenerationsError",
    "SequenceKDTransferSet",
    "TeacherGenerations",
    "IDXFileError",
    "ImageTransferSet",
    "InvalidCacheFile",
    "MNISTTransferSet",
    "SynthesisedTransferSet",
    "SyntheticTransferSet",
    "TeacherCache",
    "TeacherCacheError",
    "TensorTransferSet",
    "TextClassificationTransferSet",
    "TransferSetDataModule",
]
