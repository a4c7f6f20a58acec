"""Transfer sets: what the student learns from (Hinton et al. 2015, section 3).

A transfer set may be partly unlabeled (``target == -1``: the sample still carries the
teacher's knowledge) and may omit classes entirely (the student must learn them from the
teacher's soft targets alone). Batches are dicts: ``input``, ``target``, ``index``; ``view``
when the training images are augmented (which augmented view of the sample this is), and the
teacher's cached outputs when a :class:`~kd_lightning.data.teacher_cache.TeacherCache` is
attached.

Augmentation is replayable: the random parameters of view ``v`` of sample ``i`` are a function
of ``(seed, i, v)``, and the view a sample is shown in an epoch is a function of
``(epoch, i)``. The sampler hands ``(position, epoch)`` to the dataset, so the choice needs no
state in the DataLoader workers and a resumed run sees the same images.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kd_lightning.data.teacher_cache import SplitOutputs, TeacherCache
from kd_lightning.functional.soft_target import IGNORE_INDEX

Split = tuple[torch.Tensor, torch.Tensor]


ViewFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``(indices, epoch) -> views``: which augmented view of each sample an epoch shows."""


class TensorTransferSet(Dataset):
    """In-memory samples; fetches whole batches at once (``__getitems__``) as a dict of tensors.

    Keys are positions, or ``(position, epoch)`` pairs from an :class:`EpochSeededSampler` with
    ``with_epoch=True`` (plain positions count as epoch 0).

    Args:
        inputs: samples, shape (N, ...).
        targets: labels (N,), ``-1`` for unlabeled samples.
        indices: each sample's position in the full split (``index`` in the batch).
        view_fn: when given, batches carry ``view = view_fn(index, epoch)``.
        teacher_outputs: cached teacher outputs of the split, looked up by ``(index, view)``.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor,
        view_fn: ViewFn | None = None,
        teacher_outputs: SplitOutputs | None = None,
    ) -> None:
        if not len(inputs) == len(targets) == len(indices):
            raise ValueError("inputs, targets and indices must have the same length")
        self.inputs, self.targets, self.indices = inputs, targets, indices
        self.view_fn = view_fn
        self.teacher_outputs = teacher_outputs

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getitems__(self, keys: list) -> dict[str, torch.Tensor]:
        if keys and isinstance(keys[0], (tuple, list)):
            positions = [int(k[0]) for k in keys]
            epoch = int(keys[0][1])
        else:
            positions, epoch = [int(k) for k in keys], 0
        rows = torch.as_tensor(positions, dtype=torch.long)
        index = self.indices[rows]
        batch = {"input": self.inputs[rows], "target": self.targets[rows], "index": index}
        views = None
        if self.view_fn is not None:
            views = self.view_fn(index, epoch)
            batch["view"] = views
        if self.teacher_outputs is not None:
            if views is None:
                views = torch.zeros_like(index)
            batch.update(self.teacher_outputs.lookup(index, views))
        return batch


def _collate_batch(batch: dict[str, torch.Tensor] | list) -> dict[str, torch.Tensor]:
    # TensorTransferSet.__getitems__ already returns a collated batch.
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


class EpochSeededSampler(Sampler):
    """Random order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees
    exactly the batches an uninterrupted run would have seen.

    Args:
        num_samples: size of the dataset.
        seed: shuffling seed.
        with_epoch: yield ``(position, epoch)`` pairs instead of positions, so the dataset can
            pick each sample's augmented view for the epoch.
    """

    def __init__(self, num_samples: int, seed: int, with_epoch: bool = False) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.with_epoch:
            return iter([(position, self.epoch) for position in order])
        return iter(order)


def _view_offsets(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random offset in [0, 2**31) per (seed, index): views cycle out of phase."""
    mixed = (indices.long() * 0x9E3779B1 + (seed & 0x7FFFFFFF) * 0x85EBCA6B) & 0x7FFFFFFF
    return (mixed ^ (mixed >> 15)) * 0x2C1B3C6D & 0x7FFFFFFF


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
        teacher_cache: precompute the teacher's outputs once and put them in every batch
            (:class:`~kd_lightning.data.teacher_cache.TeacherCache`); the method then needs no
            teacher (``teacher: null``).
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
        teacher_cache: TeacherCache | None = None,
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
        self.teacher_cache = teacher_cache
        self.datasets: dict[str, TensorTransferSet] = {}
        self._raw_splits: dict[str, Split] = {}

    @abc.abstractmethod
    def load_split(self, split: str) -> Split:
        """Return ``(inputs, targets)`` of ``split`` in {"train", "val", "test"}; fixed for a split_seed."""

    def raw_split(self, split: str) -> Split:
        """``load_split(split)``, read once: the full split before omitted classes and labels."""
        if split not in self._raw_splits:
            self._raw_splits[split] = self.load_split(split)
        return self._raw_splits[split]

    # ------------------------------------------------------------------ transforms
    @property
    def augments_train(self) -> bool:
        """Whether :meth:`transform_batch` applies a random augmentation to training batches."""
        return False

    def transform_settings(self) -> dict[str, Any]:
        """What :meth:`transform_batch` does, as plain data (recorded in teacher caches)."""
        return {}

    @property
    def augment_seed(self) -> int:
        """Seed of the per-(index, view) augmentation parameters: the cache's, else the shuffling seed."""
        if self.teacher_cache is not None:
            return self.teacher_cache.seed
        if self.shuffle_seed is None:
            self.setup()
        return int(self.shuffle_seed)

    def transform_batch(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        """Turn a batch of stored samples into model inputs, on the batch's device (identity here).

        Runs in :meth:`on_after_batch_transfer`, i.e. after the batch reached the accelerator,
        batched. ``split`` is ``train`` for training batches (``batch["view"]`` says which
        augmented view to produce) and ``val``/``test`` otherwise. A teacher cache runs the
        teacher on exactly what this returns.
        """
        return batch

    def views_for(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Which view of each training sample ``epoch`` shows.

        With a cache of K views: ``(epoch + h(index)) mod K``, so every sample cycles through its
        K cached views, out of phase with the others. Without a cache: ``epoch`` (a fresh,
        replayable augmentation every epoch).
        """
        if self.teacher_cache is None:
            return torch.full_like(indices, epoch)
        views = self.teacher_cache.views
        return (epoch + _view_offsets(indices, self.augment_seed)) % views

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict) or "input" not in batch:
            return batch
        split = "train" if self.trainer is not None and self.trainer.training else "val"
        return self.transform_batch(batch, split)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (after :meth:`setup`)."""
        return tuple(self.dataset("train").inputs.shape[1:])

    def dataset(self, split: str) -> TensorTransferSet:
        if split not in self.datasets:
            self.setup()
        return self.datasets[split]

    def example_batch(self, size: int = 2) -> dict[str, torch.Tensor]:
        """A few training samples as a (transformed) batch, for start-up checks (shapes, class counts)."""
        dataset = self.dataset("train")
        return self.transform_batch(
            dataset.__getitems__(list(range(min(size, len(dataset))))), "train"
        )

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
        uses_views = self.augments_train or self.teacher_cache is not None
        return TensorTransferSet(
            inputs, targets, indices, view_fn=self.views_for if uses_views else None
        )

    def prepare_data(self) -> None:
        """Verify or build the teacher cache (Lightning runs this in one process per node).

        Subclasses that download data do so first, then call ``super().prepare_data()``.
        """
        if self.teacher_cache is not None:
            self.teacher_cache.ensure(self)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        x, y = self.raw_split("train")
        self.datasets["train"] = self._build_transfer_set(x, y)
        for split in ("val", "test"):
            x, y = self.raw_split(split)
            self.datasets[split] = TensorTransferSet(x, y, torch.arange(len(y)))
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)
        if self.teacher_cache is not None:
            self._attach_teacher_cache()

    def _attach_teacher_cache(self) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # prepare_data ran on rank 0 of each node; the others read only what it committed.
            dist.barrier()
        header = self.teacher_cache.ensure(self, may_build=not distributed)
        for split, dataset in self.datasets.items():
            dataset.teacher_outputs = self.teacher_cache.outputs(header, split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = (
            EpochSeededSampler(
                len(dataset), self.shuffle_seed, with_epoch=dataset.view_fn is not None
            )
            if shuffle
            else None
        )
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
