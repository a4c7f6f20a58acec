"""A synthesised transfer set: training on teacher-made inputs, evaluation on real data.

:class:`SynthesisedTransferSet` trains on a :class:`~kd_lightning.synthesis.SynthesisedSet`
(read from a file, or handed over by :class:`~kd_lightning.methods.data_free.DataFreeDistillation`
after it synthesised one) and validates/tests on the real val/test splits of another transfer
set, so accuracy is measured honestly. The real training split is never read: only
``evaluation.raw_split("val")`` and ``evaluation.raw_split("test")`` are called.

Training batches carry the teacher's logits recorded at synthesis (``teacher_logits``), so
any method that accepts cached teacher outputs (e.g. ``OfflineDistillation``) trains on a saved
set with no teacher at all; ``target`` is the teacher's top-1 class on the synthetic input (no
real label exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd_lightning.data.transfer_set import Split, TensorTransferSet, TransferSetDataModule
from kd_lightning.synthesis.store import SynthesisedSet


class _RecordedLogits:
    """Teacher logits held in memory, looked up like a teacher cache's split outputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def lookup(self, indices: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_logits": self.logits[indices]}


class SynthesisedTransferSet(TransferSetDataModule):
    """Train on synthesised inputs, validate and test on a real transfer set's val/test splits.

    Args:
        evaluation: the real data set (e.g. :class:`~kd_lightning.data.DigitsTransferSet`);
            only its val and test splits are read, and its ``transform_batch`` is applied to
            them (synthesised inputs are already in the model's input space).
        path: a file written by :meth:`SynthesisedSet.save`. When it exists, it is the
            training set; when it does not, a synthesising method (``DataFreeDistillation``)
            makes the set and writes it there; ``None`` keeps a synthesised set in memory only.
        batch_size: samples per batch (default: the evaluation set's batch size).
        num_workers: DataLoader workers.
        shuffle_seed: seed of the epoch-wise shuffling (default: the run's seed).
    """

    def __init__(
        self,
        evaluation: TransferSetDataModule,
        path: str | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        if not isinstance(evaluation, TransferSetDataModule):
            raise TypeError(
                "evaluation must be a TransferSetDataModule (the real data whose val/test splits "
                f"measure the student), got {type(evaluation).__name__}"
            )
        super().__init__(
            num_classes=evaluation.num_classes,
            batch_size=batch_size if batch_size is not None else evaluation.batch_size,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
        )
        self.evaluation = evaluation
        self.path = path
        self.synthesised: SynthesisedSet | None = None

    # ------------------------------------------------------------------ the synthesised set
    @property
    def has_synthesised_set(self) -> bool:
        """Whether a training set is available (attached, or a file at ``path``)."""
        return self.synthesised is not None or (self.path is not None and Path(self.path).is_file())

    def synthesised_set(self) -> SynthesisedSet:
        """The training set: the attached one, else the file at ``path`` (read once)."""
        if self.synthesised is None:
            if self.path is None:
                raise RuntimeError(
                    "SynthesisedTransferSet has no training set: give `path` (a file written by "
                    "SynthesisedSet.save) or train with DataFreeDistillation and a synthesiser, "
                    "which makes the set"
                )
            self.synthesised = SynthesisedSet.load(self.path)
            self._check_classes(self.synthesised)
        return self.synthesised

    def attach(self, synthesised: SynthesisedSet, save: bool = True) -> None:
        """Use ``synthesised`` as the training set (and write it to ``path`` if given and ``save``)."""
        self._check_classes(synthesised)
        self.synthesised = synthesised
        if save and self.path is not None:
            synthesised.save(self.path)
        self.datasets.pop("train", None)
        self._raw_splits.pop("train", None)
        if self.datasets:
            self._build_train()

    def _check_classes(self, synthesised: SynthesisedSet) -> None:
        if synthesised.num_classes != self.num_classes:
            source = f" in {self.path!r}" if self.path else ""
            raise ValueError(
                f"the synthesised set{source} has {synthesised.num_classes} classes but the "
                f"evaluation data has {self.num_classes}: synthesise it from a teacher of this task"
            )

    # ------------------------------------------------------------------ splits
    def load_split(self, split: str) -> Split:
        if split == "train":
            synthesised = self.synthesised_set()
            return synthesised.inputs, synthesised.teacher_labels
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return self.evaluation.raw_split(split)

    def _build_train(self) -> None:
        synthesised = self.synthesised_set()
        indices = torch.arange(len(synthesised))
        self.datasets["train"] = TensorTransferSet(
            synthesised.inputs,
            synthesised.teacher_labels,
            indices,
            teacher_outputs=_RecordedLogits(synthesised.teacher_logits.float()),
        )

    def setup(self, stage: str | None = None) -> None:
        """Read val/test from the evaluation set; the training set as soon as one exists."""
        if "val" not in self.datasets:
            for split in ("val", "test"):
                x, y = self.raw_split(split)
                self.check_labels(split, y)
                self.datasets[split] = TensorTransferSet(x, y, torch.arange(len(y)))
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)
        if "train" not in self.datasets and self.has_synthesised_set:
            self._build_train()

    def dataset(self, split: str) -> TensorTransferSet:
        self.setup()
        if split not in self.datasets:
            self.synthesised_set()  # raises the message that says how to get a training set
        return self.datasets[split]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, known from the val split before any synthesis."""
        if self.has_synthesised_set:
            return tuple(self.synthesised_set().inputs.shape[1:])
        example = self.evaluation.transform_batch(self.dataset("val").__getitems__([0]), "val")
        return tuple(example["input"].shape[1:])

    def example_batch(self, size: int = 2) -> dict[str, torch.Tensor]:
        """Training samples when a set exists; otherwise (validate/test only) val samples."""
        if self.has_synthesised_set:
            return super().example_batch(size)
        dataset = self.dataset("val")
        return self.transform_batch(
            dataset.__getitems__(list(range(min(size, len(dataset))))), "val"
        )

    # ------------------------------------------------------------------ transforms
    def transform_settings(self) -> dict[str, Any]:
        return {"evaluation": self.evaluation.transform_settings()}

    def transform_batch(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        # Synthesised inputs were optimised in the model's input space: only real data needs
        # the evaluation set's transform (e.g. normalisation).
        if split == "train":
            return batch
        return self.evaluation.transform_batch(batch, split)

    def prepare_data(self) -> None:
        self.evaluation.prepare_data()
