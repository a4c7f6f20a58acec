"""Where a teacher cache reads its samples from: the library's tensor transfer sets, any
LightningDataModule, or DataLoaders / map-style datasets by split.

A *tensor source* (what :class:`~kd_lightning.data.TransferSetDataModule` provides:
``raw_split``, ``transform_batch``, ``num_classes``, ``augments_train``,
``transform_settings``) is read split by split as tensors and transformed on the device, view by
view. Any other source is read through its split datasets in dataset order, with its own collate
function and batch-transfer hooks; a :class:`~kd_lightning.data.TransferSet` contributes every
item of the dataset it wraps (``index`` is the position there).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from kd_lightning.data.batch import batch_size, normalise_batch
from kd_lightning.data.cache_format import TeacherCacheError
from kd_lightning.data.datasets import TransferSet
from kd_lightning.digest import tensor_digest

FINGERPRINT_SAMPLES = 16
"""Items read to fingerprint a generic split (evenly spaced, first and last included)."""

Batch = tuple[str, Any, torch.Tensor, int]
"""``(split, model input, rows of the split, view)`` for the teacher."""


def is_tensor_source(source: Any) -> bool:
    """Whether ``source`` provides tensor splits and device transforms (a TransferSetDataModule)."""
    return hasattr(source, "raw_split") and hasattr(source, "transform_batch")


def _implemented(source: Any, name: str) -> bool:
    method = getattr(type(source), name, None)
    if method is None:
        return False
    # LightningDataModule's own hooks only raise "must be implemented".
    return not getattr(method, "__module__", "").startswith(("lightning.", "pytorch_lightning."))


def split_datasets(source: Any, splits: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """``{split: (map-style dataset, collate function)}`` of a generic source.

    Raises:
        TeacherCacheError: no split found, a split that is not one DataLoader, or an iterable
            dataset (the cache needs positions), each naming the fix.
    """
    entries: dict[str, Any] = {}
    if isinstance(source, DataLoader):
        entries["train"] = source
    elif isinstance(source, Mapping):
        entries = {split: source[split] for split in splits if split in source}
    else:
        for split in splits:
            if _implemented(source, f"{split}_dataloader"):
                entries[split] = getattr(source, f"{split}_dataloader")()
    if not entries:
        raise TeacherCacheError(
            f"{type(source).__name__} provides none of the splits {list(splits)}: give a "
            "LightningDataModule with train_dataloader(), or a dict {'train': DataLoader, ...}"
        )
    found = {}
    for split, entry in entries.items():
        if isinstance(entry, DataLoader):
            dataset, collate = entry.dataset, entry.collate_fn
        elif hasattr(entry, "__getitem__") and hasattr(entry, "__len__"):
            dataset, collate = entry, default_collate
        else:
            raise TeacherCacheError(
                f"the {split} data of {type(source).__name__} is a {type(entry).__name__}; the "
                "teacher cache needs one DataLoader (or map-style dataset) per split"
            )
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TeacherCacheError(
                f"the {split} dataset ({type(dataset).__name__}) is iterable-style; the teacher "
                "cache stores one row per position and needs a map-style dataset (__len__ and "
                "__getitem__)"
            )
        if isinstance(dataset, TransferSet):
            dataset = dataset.full()
        found[split] = (dataset, collate)
    return found


def _qualname(dataset: Any) -> str:
    inner = dataset.dataset if isinstance(dataset, TransferSet) else dataset
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for key in sorted(value) for t in _tensors(value[key])]
    return []


def fingerprints(datasets: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """Per split: rows, dataset class, and a digest of up to :data:`FINGERPRINT_SAMPLES` items.

    A spot check, not a full pass over the data: it detects another data set, another length,
    order or content at the sampled positions, without reading every sample on every run.
    """
    data = {}
    for split, (dataset, collate) in datasets.items():
        rows = len(dataset)
        positions = np.unique(np.linspace(0, rows - 1, min(FINGERPRINT_SAMPLES, rows)).round())
        tensors = []
        for position in positions.astype(int).tolist():
            sample = normalise_batch(collate([dataset[position]]))
            tensors += _tensors(sample["input"]) + _tensors(sample.get("target"))
        data[split] = {
            "rows": rows,
            "dataset": _qualname(dataset),
            "fingerprint": tensor_digest(*tensors),
        }
    return data


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, tuples and lists) moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def batch_device(batch: dict[str, Any]) -> torch.device:
    """The device of a normalised batch's first input tensor (CPU if none)."""
    tensors = _tensors(batch["input"])
    return tensors[0].device if tensors else torch.device("cpu")


def tensor_batches(
    source: Any, splits: Sequence[str], views: int, size: int, device: torch.device
) -> Iterator[Batch]:
    """Every view of every sample of a tensor source, transformed as training would see it."""
    for split in splits:
        inputs, _ = source.raw_split(split)
        for view in range(views if split == "train" else 1):
            for start in range(0, len(inputs), size):
                rows = torch.arange(start, min(start + size, len(inputs)))
                batch = {
                    "input": inputs[rows].to(device),
                    "index": rows.to(device),
                    "view": torch.full_like(rows, view).to(device),
                }
                yield split, source.transform_batch(batch, split)["input"], rows, view


def dataset_batches(
    source: Any, datasets: dict[str, tuple[Any, Any]], size: int, device: torch.device
) -> Iterator[Batch]:
    """Every sample of a generic source in dataset order, through its batch-transfer hooks."""
    for split, (dataset, collate) in datasets.items():
        position = 0
        for raw in DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate):
            if hasattr(source, "on_before_batch_transfer"):
                raw = source.on_before_batch_transfer(raw, 0)
            raw = to_device(raw, device)
            if hasattr(source, "on_after_batch_transfer"):
                raw = source.on_after_batch_transfer(raw, 0)
            batch = normalise_batch(raw)
            count = batch_size(batch)
            if "index" in batch:
                rows = batch["index"].long().cpu()
            else:
                rows = torch.arange(position, position + count)
            position += count
            yield split, batch["input"], rows, 0


def chain(first: Batch | None, rest: Iterator[Batch]) -> Iterator[Batch]:
    """``first`` (when the build already took it to learn the output width), then ``rest``."""
    if first is not None:
        yield first
    yield from rest


def token_mask(inputs: Any) -> torch.Tensor:
    """``(B, L)`` bool: the real tokens of a batch of token sequences (right padding only).

    From ``attention_mask`` when the input has one, else every position of ``input_ids`` (or of
    the input tensor) is real.

    Raises:
        TeacherCacheError: an input that is not token sequences, or left padding (a per-token
            cache stores positions ``0..n-1`` of each sequence).
    """
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        reference = mask if mask is not None else ids
    else:
        mask, reference = None, inputs
    if not isinstance(reference, torch.Tensor) or reference.dim() != 2:
        raise TeacherCacheError(
            "a per-token teacher cache needs batches of token sequences: an input tensor "
            "(B, L), or a dict with input_ids (and attention_mask) of shape (B, L)"
        )
    if mask is None:
        return torch.ones(reference.shape, dtype=torch.bool, device=reference.device)
    real = mask != 0
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise TeacherCacheError(
            "the batches are left-padded (an attention_mask with 0 before 1): a per-token teacher "
            "cache stores positions 0..n-1 of each sequence; pad on the right (the library's "
            "text transfer sets do; for a Hugging Face tokenizer set padding_side='right')"
        )
    return real


def sequence_lengths(
    source: Any, datasets: dict[str, tuple[Any, Any]], size: int
) -> dict[str, np.ndarray]:
    """Real tokens per sequence, ``{split: (rows,) int64}``, read in one pass over the data.

    A per-token cache sizes its arrays with these before the teacher runs.
    """
    lengths = {
        split: np.zeros(len(dataset), dtype=np.int64) for split, (dataset, _) in datasets.items()
    }
    for split, inputs, rows, _ in dataset_batches(source, datasets, size, torch.device("cpu")):
        lengths[split][rows.numpy()] = token_mask(inputs).sum(dim=1).numpy()
    return lengths
