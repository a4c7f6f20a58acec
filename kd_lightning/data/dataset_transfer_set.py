"""Any map-style datasets as a transfer set: labeled fraction, omitted classes, teacher cache.

A user's own data, a torchvision-style dataset (``(image, label)`` items and ``.targets``), or a
tokenized Hugging Face dataset (dict items with ``labels``, batched by a padding collator),
becomes a LightningDataModule with everything the library's own transfer sets offer::

    data = DatasetTransferSet(train=my_train, val=my_val, num_classes=10, labeled_fraction=0.1)

Subclass it and override :meth:`DatasetTransferSet.load_dataset` to build the datasets from
arguments (for YAML configs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from kd_lightning.data.batch import check_not_empty
from kd_lightning.data.datasets import TransferSet, collate_batch
from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.transfer_set import BaseTransferSetDataModule


class DatasetTransferSet(BaseTransferSetDataModule):
    """Map-style datasets as a transfer set (batches: dicts with ``input``/``target``/``index``).

    Items are ``(input, target)`` tuples or dicts with a target (``target``, ``labels`` or
    ``label``); see :class:`~kd_lightning.data.TransferSet`. The training set gets the labeled
    fraction and omitted classes; validation and test keep every sample and label. Each split's
    labels are checked at set-up (dtype long, values in ``0..num_classes-1`` or ignored), and an
    empty training set is refused, before any step.

    Args:
        num_classes: number of classes of the task.
        train: the training (transfer) dataset (or built by :meth:`load_dataset`).
        val: the validation dataset (optional).
        test: the test dataset (optional).
        collate_fn: collate function of every loader (e.g. a padding collator for token
            sequences); default: PyTorch's default collate.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        labeled_fraction: fraction of the training set that keeps its labels, in (0, 1].
        omit_classes: classes removed from the training set (kept in val/test).
        split_seed: seed of the labeled subset.
        shuffle_seed: seed of the epoch-wise shuffling (default: the run's seed).
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`),
            in every batch.
    """

    def __init__(
        self,
        num_classes: int,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        self.sources = {"train": train, "val": val, "test": test}
        self.collate_fn = collate_fn

    def load_dataset(self, split: str) -> Dataset | None:
        """The dataset of ``split`` (``None`` when there is none); override to build it lazily."""
        return self.sources[split]

    def collate(self, samples: Any) -> Any:
        if self.collate_fn is not None and not isinstance(samples, dict):
            return self.collate_fn(samples)
        return collate_batch(samples)

    def build_datasets(self) -> dict[str, TransferSet]:
        train = self.load_dataset("train")
        if train is None:
            raise ValueError(
                f"{type(self).__name__} has no training dataset: pass train=<a map-style "
                "dataset> (or override load_dataset)"
            )
        check_not_empty(
            len(train), f"the train dataset of {type(self).__name__}", "give it samples"
        )
        datasets = {}
        for split in ("train", "val", "test"):
            dataset = train if split == "train" else self.load_dataset(split)
            if dataset is None:
                continue
            wrapped = TransferSet(dataset)
            self.check_labels(split, wrapped.all_targets)
            if split == "train":
                wrapped = TransferSet(
                    dataset,
                    wrapped.all_targets,
                    self.labeled_fraction,
                    self.omit_classes,
                    self.split_seed,
                )
                self.check_training_set(len(dataset), len(wrapped))
            datasets[split] = wrapped
        return datasets

    def val_dataloader(self) -> Any:
        self._build_once()
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> Any:
        self._build_once()
        return self._loader("test", shuffle=False) if "test" in self.datasets else []

    def predict_dataloader(self) -> Any:
        return self.test_dataloader()
