"""Transfer-set data modules: what the student learns from (Hinton et al. 2015, section 3).

:class:`BaseTransferSetDataModule` holds what every transfer set shares: the labeled fraction
and omitted classes (applied by :func:`~kd_lightning.data.datasets.select_transfer_samples`),
epoch-seeded shuffling, the teacher cache, dict batches, and the set-up checks (label dtype and
range, no empty split) that run before any step. :class:`TransferSetDataModule` is the base of
in-memory tensor data sets (digits, CIFAR, MNIST, synthetic) with transforms and replayable
augmentation on the device; :class:`~kd_lightning.data.DatasetTransferSet` wraps any map-style
datasets.

Batches are dicts: ``input``, ``target``, ``index``; ``view`` when the training images are
augmented (which augmented view of the sample this is), and the teacher's cached outputs when a
:class:`~kd_lightning.data.teacher_cache.TeacherCache` is attached.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.batch import check_not_empty, check_targets, normalise_batch
from kd_lightning.data.datasets import (
    EpochSeededSampler,
    TensorTransferSet,
    ViewFn,
    collate_batch,
    select_transfer_samples,
)
from kd_lightning.data.split_identity import SPLIT_ARGUMENTS, plain, split_digest
from kd_lightning.data.teacher_cache import TeacherCache

Split = tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "BaseTransferSetDataModule",
    "EpochSeededSampler",
    "Split",
    "TensorTransferSet",
    "TransferSetDataModule",
    "ViewFn",
]

_STAGE_SPLIT = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}


def _view_offsets(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random offset in [0, 2**31) per (seed, index): views cycle out of phase."""
    mixed = (indices.long() * 0x9E3779B1 + (seed & 0x7FFFFFFF) * 0x85EBCA6B) & 0x7FFFFFFF
    return (mixed ^ (mixed >> 15)) * 0x2C1B3C6D & 0x7FFFFFFF


class BaseTransferSetDataModule(L.LightningDataModule, abc.ABC):
    """What every transfer set shares: selection, shuffling, cache, set-up checks, loaders.

    Subclasses implement :meth:`build_datasets`.

    Args:
        num_classes: number of classes of the task (known before any data is read, so the CLI
            can link it into the student).
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
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
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
        self.datasets: dict[str, Any] = {}
        self._cache_attached = False
        self._split_identity: dict[str, Any] | None = None

    @abc.abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """The datasets by split (``train`` required; ``val``/``test`` when available)."""

    def cache_source(self) -> Any:
        """What the teacher cache reads (see :meth:`TeacherCache.ensure`): the split loaders."""
        self._build_once()
        return {split: self._loader(split, shuffle=False) for split in self.datasets}

    def split_identity(self) -> dict[str, Any] | None:
        """Which samples are in each evaluation split: the data module's class, the arguments
        that decide the splits, and a digest of each val/test split's content (see
        :mod:`kd_lightning.data.split_identity`); recorded in checkpoints at fit and compared
        when a checkpoint is evaluated. ``None`` when the datasets were given directly (their
        splits are the user's; not checked)."""
        if any(v is not None for v in getattr(self, "sources", {}).values()):
            return None
        if getattr(self, "_split_identity", None) is None:
            self._build_once()
            arguments = {k: getattr(self, k) for k in SPLIT_ARGUMENTS if hasattr(self, k)}
            self._split_identity = {
                "data": f"{type(self).__module__}.{type(self).__qualname__}",
                "arguments": plain(arguments),
                "digests": {s: split_digest(d) for s, d in self.datasets.items() if s != "train"},
            }
        return self._split_identity

    # ------------------------------------------------------------------ set-up checks
    def check_labels(self, split: str, targets: Any) -> None:
        """Label dtype and range of a split, before any step (:func:`check_targets`)."""
        check_targets(targets, self.num_classes, f"the {split} labels of {type(self).__name__}")

    def check_training_set(self, count_before: int, count_after: int) -> None:
        """Refuse an empty training set, saying whether the data or the selection emptied it."""
        name = type(self).__name__
        check_not_empty(
            count_before,
            f"the train split of {name}",
            "check the data source (path, split, filters) before training",
        )
        check_not_empty(
            count_after,
            f"the transfer set of {name} after omit_classes={self.omit_classes}",
            "every training sample is of an omitted class; omit fewer classes",
        )

    # ------------------------------------------------------------------ datasets
    def dataset(self, split: str) -> Any:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ValueError(
                f"{type(self).__name__} has no {split!r} split (it has {sorted(self.datasets)})"
            )
        return self.datasets[split]

    def prepare_data(self) -> None:
        """Verify or build the teacher cache (Lightning runs this in one process per node).

        Subclasses that download data do so first, then call ``super().prepare_data()``.
        """
        if self.teacher_cache is not None:
            self.teacher_cache.ensure(self.cache_source(), owner=self)

    def _build_once(self) -> bool:
        """Build the datasets (and run the label checks) unless built; True when built now."""
        if self.datasets:
            return False
        self.datasets = dict(self.build_datasets())
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)
        return True

    def setup(self, stage: str | None = None) -> None:
        self._build_once()
        if self.teacher_cache is not None and not self._cache_attached:
            self._attach_teacher_cache()
            self._cache_attached = True
        split = _STAGE_SPLIT.get(stage or "")
        if split is not None and split != "train" and split in self.datasets:
            check_not_empty(
                len(self.datasets[split]),
                f"the {split} split of {type(self).__name__}",
                f"give it samples (e.g. a non-zero {split}_size) or skip {stage}",
            )

    def _attach_teacher_cache(self) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # prepare_data ran on rank 0 of each node; the others read only what it committed.
            dist.barrier()
        header = self.teacher_cache.ensure(
            self.cache_source(), may_build=not distributed, owner=self
        )
        for split, dataset in self.datasets.items():
            dataset.teacher_outputs = self.teacher_cache.outputs(header, split)

    # ------------------------------------------------------------------ loaders
    def collate(self, samples: Any) -> Any:
        """Collate function of every loader (dict batches from dict samples)."""
        return collate_batch(samples)

    def example_batch(self, size: int = 2) -> dict[str, Any]:
        """A few training samples as a normalised batch, for start-up checks (shapes, class counts)."""
        dataset = self.dataset("train")
        return normalise_batch(
            self.collate(dataset.__getitems__(list(range(min(size, len(dataset))))))
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        with_epoch = getattr(dataset, "view_fn", None) is not None
        sampler = (
            EpochSeededSampler(len(dataset), self.shuffle_seed, with_epoch) if shuffle else None
        )
        if sampler is not None:
            # Worker processes prefetch as soon as the iterator starts, which Lightning does
            # before its own set_epoch: a resumed run must start at its epoch, not at 0.
            sampler.set_epoch(_epoch_to_run(getattr(self, "trainer", None)))
        # The loader's own generator: starting an iterator draws its worker seed from it, not
        # from the global one, so persistent workers (one draw per run, not per epoch) leave
        # the global stream (dropout, CRD negatives) as an unbroken run has it after a resume.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(int(self.shuffle_seed)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _epoch_to_run(trainer: Any) -> int:
    """The epoch a fit starts (or resumes) at: the one Lightning passes to ``set_epoch``."""
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    processed = getattr(getattr(progress, "current", None), "processed", None)
    return int(processed) if isinstance(processed, int) else 0


class TransferSetDataModule(BaseTransferSetDataModule):
    """Base of in-memory tensor transfer sets: splits, labeled fraction, omitted classes, dict batches.

    Subclasses implement :meth:`load_split` and pass ``num_classes`` to this constructor, so it
    is known before any data is read (the CLI links it into the student). Transforms run batched
    on the device (:meth:`transform_batch`), with replayable augmentation.

    Args:
        num_classes: number of classes of the task.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        labeled_fraction: fraction of the transfer set that keeps its labels, in (0, 1].
        omit_classes: classes removed from the transfer (training) set (kept in val/test).
        split_seed: seed of the fixed data splits and labeled subset.
        shuffle_seed: seed of the epoch-wise shuffling (default: the run's seed).
        teacher_cache: precomputed teacher outputs, put in every batch.
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
        self._raw_splits: dict[str, Split] = {}

    @abc.abstractmethod
    def load_split(self, split: str) -> Split:
        """Return ``(inputs, targets)`` of ``split`` in {"train", "val", "test"}; fixed for a split_seed."""

    def raw_split(self, split: str) -> Split:
        """``load_split(split)``, read once: the full split before omitted classes and labels."""
        if split not in self._raw_splits:
            self._raw_splits[split] = self.load_split(split)
        return self._raw_splits[split]

    def cache_source(self) -> Any:
        return self

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

    def example_batch(self, size: int = 2) -> dict[str, torch.Tensor]:
        """A few training samples as a (transformed) batch, for start-up checks (shapes, class counts)."""
        dataset = self.dataset("train")
        return self.transform_batch(
            dataset.__getitems__(list(range(min(size, len(dataset))))), "train"
        )

    def _build_transfer_set(self, inputs: torch.Tensor, targets: torch.Tensor) -> TensorTransferSet:
        self.check_labels("train", targets)
        positions, kept = select_transfer_samples(
            targets, self.labeled_fraction, self.omit_classes, self.split_seed
        )
        self.check_training_set(len(targets), len(positions))
        # `index` stays the position in the full train split so caches and memory banks keyed by
        # it do not depend on which classes were omitted.
        uses_views = self.augments_train or self.teacher_cache is not None
        return TensorTransferSet(
            inputs[positions], kept, positions, view_fn=self.views_for if uses_views else None
        )

    def build_datasets(self) -> dict[str, TensorTransferSet]:
        datasets = {"train": self._build_transfer_set(*self.raw_split("train"))}
        for split in ("val", "test"):
            x, y = self.raw_split(split)
            self.check_labels(split, y)
            datasets[split] = TensorTransferSet(x, y, torch.arange(len(y)))
        return datasets
