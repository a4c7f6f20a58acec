"""The embedded default transfer set: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

It ships inside scikit-learn, so it loads offline in milliseconds: the library's main job and
its tests need no download.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.transfer_set import Split, TransferSetDataModule


class DigitsTransferSet(TransferSetDataModule):
    """Digits (UCI ML hand-written digits via ``sklearn.datasets.load_digits``) as a transfer set.

    Images are ``(1, 8, 8)`` floats scaled from 0..16 to 0..1. A fixed split (by ``split_seed``)
    holds out ``test_size`` samples for test and ``val_size`` for validation; the rest is the
    transfer (training) set.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        labeled_fraction: fraction of the transfer set that keeps labels, in (0, 1].
        omit_classes: digits removed from the transfer set (kept in val/test).
        split_seed: seed of the fixed split.
        shuffle_seed: seed of epoch shuffling (default: the run's seed).
        val_size: number of validation samples.
        test_size: number of test samples.
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        val_size: int = 180,
        test_size: int = 360,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__(
            num_classes=10,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        self.val_size, self.test_size = val_size, test_size
        self._splits: dict[str, Split] | None = None

    def _load(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        images = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        labels = torch.as_tensor(y, dtype=torch.long)
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.split_seed)
        )
        test = order[: self.test_size]
        val = order[self.test_size : self.test_size + self.val_size]
        train = order[self.test_size + self.val_size :]
        return {
            name: (images[idx], labels[idx])
            for name, idx in [("train", train), ("val", val), ("test", test)]
        }

    def load_split(self, split: str) -> Split:
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]
