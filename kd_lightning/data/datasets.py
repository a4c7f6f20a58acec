"""Transfer-set datasets: any map-style dataset with labeled fraction, omitted classes, index
and cached teacher outputs (Hinton et al. 2015, section 3).

A transfer set may be partly unlabeled (the target becomes ``-1``: the sample still carries the
teacher's knowledge) and may omit classes entirely (the student must learn them from the
teacher's soft targets alone). :func:`select_transfer_samples` is the one place that decides
which samples are kept and which keep their labels; :class:`TransferSet` applies it to any
map-style dataset and :class:`TensorTransferSet` holds in-memory tensors, fetching whole batches
at once.

Samples keep the structure the wrapped dataset gives them: an ``(input, target)`` item becomes
``{"input", "target"}``, a dict item (e.g. a tokenizer's output with ``labels``) stays a dict,
so the dataset's own collate function (e.g. a padding collator) still works; ``index``, ``view``
and cached teacher outputs are added. :func:`kd_lightning.data.batch.normalise_batch` maps the
collated batch to the batch contract.

Augmentation is replayable: the view a sample is shown in an epoch is a function of
``(epoch, index)``, and the sampler hands ``(position, epoch)`` to the dataset, so the choice
needs no state in the DataLoader workers and a resumed run sees the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, Sampler

from kd_lightning.data.batch import IGNORE_INDEX, TARGET_KEYS, TOKEN_IGNORE_INDEX

ViewFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``(indices, epoch) -> views``: which augmented view of each sample an epoch shows."""


class OutputLookup(Protocol):
    """Cached teacher outputs of one split (a teacher cache's split reader, or logits in memory)."""

    def lookup(self, indices: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]: ...


def select_transfer_samples(
    targets: torch.Tensor,
    labeled_fraction: float = 1.0,
    omit_classes: Sequence[int] = (),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples form the transfer set, and their targets.

    Samples of ``omit_classes`` are removed. Of the rest, ``labeled_fraction`` keep their label,
    stratified per class (at least one sample per class), chosen with ``seed``; the others get
    :data:`IGNORE_INDEX` (per-token targets: :data:`TOKEN_IGNORE_INDEX` everywhere, drawn
    uniformly). Already unlabeled samples stay unlabeled.

    Args:
        targets: labels of the full split, ``(N,)`` long (or ``(N, L)`` per token).
        labeled_fraction: in (0, 1].
        omit_classes: classes to remove (class labels only).
        seed: seed of the labeled subset.

    Returns:
        ``(positions, targets)``: kept positions in the full split (long, ascending) and their
        targets with the unlabeled ones masked.
    """
    per_token = targets.dim() > 1
    if per_token and omit_classes:
        raise ValueError("omit_classes applies to class labels, not to per-token targets")
    keep = torch.ones(len(targets), dtype=torch.bool)
    for c in omit_classes:
        keep &= targets != c
    positions = keep.nonzero().flatten()
    kept = targets[positions].clone()
    if labeled_fraction < 1:
        generator = torch.Generator().manual_seed(seed + 1)
        labeled = torch.zeros(len(kept), dtype=torch.bool)
        groups = (
            [torch.arange(len(kept))]
            if per_token
            else [(kept == c).nonzero().flatten() for c in kept.unique() if int(c) >= 0]
        )
        for members in groups:
            count = max(1, round(labeled_fraction * len(members)))
            labeled[members[torch.randperm(len(members), generator=generator)[:count]]] = True
        kept[~labeled] = TOKEN_IGNORE_INDEX if per_token else IGNORE_INDEX
    return positions, kept


def _positions_and_epoch(keys: Sequence) -> tuple[list[int], int]:
    if keys and isinstance(keys[0], (tuple, list)):
        return [int(k[0]) for k in keys], int(keys[0][1])
    return [int(k) for k in keys], 0


class _TransferSetBase(Dataset):
    """What both transfer-set datasets share: view choice and the cached-output lookup."""

    indices: torch.Tensor
    view_fn: ViewFn | None
    teacher_outputs: OutputLookup | None

    def _extras(self, index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        extras = {"index": index}
        views = None
        if self.view_fn is not None:
            views = extras["view"] = self.view_fn(index, epoch)
        if self.teacher_outputs is not None:
            views = torch.zeros_like(index) if views is None else views
            extras.update(self.teacher_outputs.lookup(index, views))
        return extras


def _split_item(item: Any) -> tuple[dict[str, Any], str]:
    """A dataset item as a dict and the key of its target."""
    if isinstance(item, Mapping):
        key = next((k for k in TARGET_KEYS if k in item), None)
        if key is None:
            raise KeyError(
                f"a dataset item dict needs a target ('target', 'labels' or 'label'); got keys "
                f"{sorted(item)}"
            )
        return dict(item), key
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"input": item[0], "target": item[1]}, "target"
    raise TypeError(
        "a dataset item must be an (input, target) tuple or a dict with a target ('target', "
        f"'labels' or 'label'); got {type(item).__name__}"
    )


def dataset_targets(dataset: Any) -> torch.Tensor:
    """The targets of every item of a map-style dataset, as a tensor (dtype as given).

    Read from ``dataset.targets`` (torchvision's convention) or a ``labels``/``label`` column
    (Hugging Face ``datasets``) when there is one; otherwise every item is read once.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "column_names"):
        column = next((c for c in ("labels", "label") if c in dataset.column_names), None)
        targets = dataset[column] if column else None
    if targets is None:
        items = [_split_item(dataset[i]) for i in range(len(dataset))]
        targets = [item[key] for item, key in items]
        if targets and isinstance(targets[0], torch.Tensor):
            return torch.stack(targets)
    return torch.as_tensor(targets)


class TransferSet(_TransferSetBase):
    """Any map-style dataset as a transfer set: labeled fraction, omitted classes, index, cache.

    Items of ``dataset`` are ``(input, target)`` tuples or dicts with a target (``target``,
    ``labels`` or ``label``; other entries are model inputs). Each item of the transfer set is
    a dict: ``input`` and ``target`` for a tuple item, the item's own keys for a dict item, plus
    ``index`` (the item's position in ``dataset``, a 0-d long tensor), ``view`` when a
    ``view_fn`` is set, and the cached teacher outputs of the item when ``teacher_outputs`` is
    set. The default collate function batches them into the batch contract's dict.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        targets: the labels of every item of ``dataset``; by default ``dataset.targets``, a
            ``labels`` column, or read from the items (see :func:`dataset_targets`).
        labeled_fraction: fraction of the samples that keep their labels, in (0, 1].
        omit_classes: classes removed from the transfer set.
        seed: seed of the labeled subset (not the run's seed: fixed splits across seeds).
        view_fn: when given, items carry ``view = view_fn(index, epoch)``.
        teacher_outputs: cached teacher outputs of ``dataset``, looked up by ``(index, view)``.
    """

    def __init__(
        self,
        dataset: Any,
        targets: torch.Tensor | Sequence[int] | None = None,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] = (),
        seed: int = 0,
        view_fn: ViewFn | None = None,
        teacher_outputs: OutputLookup | None = None,
    ) -> None:
        if not 0 < labeled_fraction <= 1:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
        self.dataset = dataset
        self.all_targets = dataset_targets(dataset) if targets is None else torch.as_tensor(targets)
        if len(self.all_targets) != len(dataset):
            raise ValueError(
                f"targets has {len(self.all_targets)} entries but the dataset {len(dataset)} items"
            )
        self.labeled_fraction, self.omit_classes, self.seed = labeled_fraction, omit_classes, seed
        self.indices, self.targets = select_transfer_samples(
            self.all_targets, labeled_fraction, omit_classes, seed
        )
        self.view_fn, self.teacher_outputs = view_fn, teacher_outputs

    def full(self) -> TransferSet:
        """Every item of the wrapped dataset with its own label (what a teacher cache covers)."""
        return TransferSet(self.dataset, self.all_targets)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict[str, Any]]:
        positions, epoch = _positions_and_epoch(keys)
        rows = torch.as_tensor(positions, dtype=torch.long)
        extras = self._extras(self.indices[rows], epoch)
        samples = []
        for i, position in enumerate(positions):
            item, key = _split_item(self.dataset[int(self.indices[position])])
            item[key] = self.targets[position]
            samples.append({**item, **{k: v[i] for k, v in extras.items()}})
        return samples


class TensorTransferSet(_TransferSetBase):
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
        teacher_outputs: OutputLookup | None = None,
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
        positions, epoch = _positions_and_epoch(keys)
        rows = torch.as_tensor(positions, dtype=torch.long)
        batch = {"input": self.inputs[rows], "target": self.targets[rows]}
        return {**batch, **self._extras(self.indices[rows], epoch)}


def collate_batch(batch: dict[str, Any] | list) -> Any:
    """Collate for transfer sets: a :class:`TensorTransferSet` batch is already collated."""
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
