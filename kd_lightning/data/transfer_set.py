"""Transfer sets: what the student learns from (Hinton et al. 2015, section 3).

A transfer set may be partly unlabeled (``target == -1``: the sample still carries the
teacher's knowledge) and may omit classes entirely (the student must learn them from the
teacher's soft targets alone). Batches are dicts: ``input``, ``target``, ``index``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kd_lightning.functional.soft_target import IGNORE_INDEX

Split = tuple[torch.Tensor, torch.Tensor]


class TensorTransferSet(Dataset):
    """In-memory samples; fetches whole batches at once (``__getitems__``) as a dict of tensors."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> None:
        if not len(inputs) == len(targets) == len(indices):
            raise ValueError("inputs, targets and indices must have the same length")
        self.inputs, self.targets, self.indices = inputs, targets, indices

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.inputs[i], "target": self.targets[i], "index": self.indices[i]}

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(positions, dtype=torch.long)
        return {
            "input": self.inputs[rows],
            "target": self.targets[rows],
            "index": self.indices[rows],
        }


def _collate_batch(batch: dict[str, torch.Tensor] | list) -> dict[str, torch.Tensor]:
    # TensorTransferSet.__getitems__ already returns a collated batch.
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class TransferSetDataModule(L.LightningDataModule, abc.ABC):
    """Base of every transfer set: splits, labeled fraction, omitted classes, dict batches.

    Subclasses implement :meth:`load_split` and pass ``num_classes`` to this constructor, so it
    is known before any data is read (the CLI links it into the student).

    Args:
        num_classes: number of classes of the task.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        labeled_fraction: fraction of the transfer set that keeps its labels, in (0, 1]; the
            others get ``target = -1`` (stratified per class, chosen with ``split_seed``).
        omit_classes: classes removed from the transfer (training) set; validation and test
            keep them, so you can measure what the student learns about them from the teacher.
        split_seed: seed of the fixed data splits and labeled subset (not the run's seed: every
            seed of a study sees the same splits).
        shuffle_seed: seed of the epoch-wise shuffling; ``None`` takes the run's seed
            (``torch.initial_seed()`` at setup).
    """

    def __init__(
        self,
        num_classes: int,
        batch_size: int = 64,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < labeled_fraction <= 1:
            raise ValueError(
                f"labeled_fraction must be in (0, 1], got {labeled_fraction}. Use 1.0 for a fully "
                "labeled transfer set, e.g. 0.1 to keep 10% of the labels."
            )
        omit = sorted(set(omit_classes or []))
        bad = [c for c in omit if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f"omit_classes names {bad}, which are not classes of this data set; valid classes "
                f"are 0..{num_classes - 1}"
            )
        if len(omit) >= num_classes:
            raise ValueError("omit_classes would remove every class from the transfer set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.labeled_fraction = labeled_fraction
        self.omit_classes = omit
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.datasets: dict[str, TensorTransferSet] = {}

    @abc.abstractmethod
    def load_split(self, split: str) -> Split:
        """Return ``(inputs, targets)`` of ``split`` in {"train", "val", "test"}; fixed for a split_seed."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (after :meth:`setup`)."""
        return tuple(self.dataset("train").inputs.shape[1:])

    def dataset(self, split: str) -> TensorTransferSet:
        if split not in self.datasets:
            self.setup()
        return self.datasets[split]

    def example_batch(self, size: int = 2) -> dict[str, torch.Tensor]:
        """A few training samples as a batch, for start-up checks (shapes, class counts)."""
        dataset = self.dataset("train")
        return dataset.__getitems__(list(range(min(size, len(dataset)))))

    def _build_transfer_set(self, inputs: torch.Tensor, targets: torch.Tensor) -> TensorTransferSet:
        indices = torch.arange(len(targets))
        keep = torch.ones(len(targets), dtype=torch.bool)
        for c in self.omit_classes:
            keep &= targets != c
        inputs, targets, indices = inputs[keep], targets[keep].clone(), indices[keep]
        if self.labeled_fraction < 1:
            generator = torch.Generator().manual_seed(self.split_seed + 1)
            labeled = torch.zeros(len(targets), dtype=torch.bool)
            for c in targets.unique():
                members = (targets == c).nonzero().flatten()
                count = max(1, round(self.labeled_fraction * len(members)))
                chosen = members[torch.randperm(len(members), generator=generator)[:count]]
                labeled[chosen] = True
            targets[~labeled] = IGNORE_INDEX
        # `index` stays the position in the full train split so caches and memory banks keyed by
        # it do not depend on which classes were omitted.
        return TensorTransferSet(inputs, targets, indices)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        x, y = self.load_split("train")
        self.datasets["train"] = self._build_transfer_set(x, y)
        for split in ("val", "test"):
            x, y = self.load_split(split)
            self.datasets[split] = TensorTransferSet(x, y, torch.arange(len(y)))
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = EpochSeededSampler(len(dataset), self.shuffle_seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
