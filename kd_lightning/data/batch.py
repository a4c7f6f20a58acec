"""The batch contract: what every method receives, whatever data module produced it.

A batch is a dict with

- ``input``: a tensor, or a dict of tensors passed to the model as ``model(**input)``;
- ``target``: long class indices; :data:`IGNORE_INDEX` (``-1``) where a sample is unlabeled,
  :data:`TOKEN_IGNORE_INDEX` (``-100``, Hugging Face's convention) where a token is masked;
- ``index`` (optional): each sample's position in its split, the key of cached teacher outputs;
- ``view`` (optional): which replayable augmented view of the sample this is;
- cached teacher outputs (optional): :data:`TEACHER_LOGITS` ``(B, C)``, or
  :data:`TEACHER_TOPK_VALUES` / :data:`TEACHER_TOPK_INDICES` ``(B, k)``.

:func:`normalise_batch` turns the batches users already have into that dict: an
``(input, target)`` tuple, or a Hugging Face style dict (``input_ids``, ``attention_mask``, ...,
``labels``). :func:`check_targets` is the start-up check of labels; :class:`TargetGuard` checks
the labels of every later batch (a user's data may hold bad labels only further in);
:func:`example_batch` gives any data module's first batch, for start-up checks.

Pure torch: no Lightning import (methods, callbacks and studies import this module).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from kd_lightning.functional.soft_target import IGNORE_INDEX

TOKEN_IGNORE_INDEX = -100
"""Target of a masked token (Hugging Face's ``ignore_index``)."""

IGNORE_VALUES = (IGNORE_INDEX, TOKEN_IGNORE_INDEX)
"""Target values that mean "no label here"."""

TEACHER_LOGITS = "teacher_logits"
"""Batch key of cached dense teacher logits, ``(B, C)`` float32."""
TEACHER_TOPK_VALUES = "teacher_topk_values"
"""Batch key of a top-k cache's log-probabilities at its temperature, ``(B, k)`` float32."""
TEACHER_TOPK_INDICES = "teacher_topk_indices"
"""Batch key of a top-k cache's class indices, ``(B, k)`` long."""
CACHED_OUTPUT_KEYS = (TEACHER_LOGITS, TEACHER_TOPK_VALUES, TEACHER_TOPK_INDICES)

TARGET_KEYS = ("target", "labels", "label")
"""Keys that hold the target in a dict batch, in order of preference."""
BATCH_KEYS = ("index", "view", *CACHED_OUTPUT_KEYS)
"""Keys of a dict batch that are never model inputs."""


def _target_key(batch: Mapping[str, Any]) -> str | None:
    return next((key for key in TARGET_KEYS if key in batch), None)


def normalise_batch(batch: Any) -> dict[str, Any]:
    """Any supported batch as the contract's dict (module docstring).

    Accepted:

    - a dict with ``input`` (returned as it is, as a plain dict);
    - an ``(input, target)`` tuple or list (``index`` is then absent);
    - a Hugging Face style mapping without ``input`` (``input_ids``, ``attention_mask``,
      ``pixel_values``, ..., and ``labels``/``label``/``target``): ``input`` becomes the dict of
      model inputs, ``target`` the labels; ``index``, ``view`` and cached teacher outputs stay
      at the top level.

    Raises:
        TypeError: another type of batch (the message lists what is accepted).
        KeyError: a dict with neither ``input`` nor a target key to separate model inputs from.
    """
    if isinstance(batch, Mapping):
        if "input" in batch:
            return dict(batch)
        target_key = _target_key(batch)
        if target_key is None:
            raise KeyError(
                "a batch dict needs an 'input' entry (and 'target'), or model inputs with "
                f"'labels' (Hugging Face style); got keys {sorted(batch)}. Return "
                "{'input': x, 'target': y} or (x, y) from your dataset."
            )
        inputs = {k: v for k, v in batch.items() if k not in BATCH_KEYS and k != target_key}
        if not inputs:
            raise KeyError(
                f"the batch dict has a target ({target_key!r}) but no model inputs; got keys "
                f"{sorted(batch)}"
            )
        extras = {k: batch[k] for k in BATCH_KEYS if k in batch}
        return {"input": inputs, "target": batch[target_key], **extras}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"input": batch[0], "target": batch[1]}
    raise TypeError(
        "a batch must be a dict with 'input' and 'target' (see TransferSetDataModule), an "
        "(input, target) tuple, or a Hugging Face style dict with 'labels'; got "
        f"{type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples of a normalised batch (from ``target``, else the first input tensor)."""
    if isinstance(batch.get("target"), torch.Tensor) and batch["target"].dim() > 0:
        return int(batch["target"].shape[0])
    inputs = batch["input"]
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return int(first.shape[0])


def _slice(value: Any, rows: int, size: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:size] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {k: _slice(v, rows, size) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return type(value)(value[:size]) if isinstance(value, list) else tuple(value[:size])
    return value


def slice_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The first ``size`` samples of a normalised batch (every per-sample entry is cut)."""
    return _slice(batch, batch_size(batch), size)


def _call_example_batch(source: Any, size: int | None) -> Any:
    method = source.example_batch
    try:
        takes_size = bool(inspect.signature(method).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        takes_size = False
    return method(size) if takes_size and size is not None else method()


def example_batch(source: Any, size: int | None = 2) -> dict[str, Any]:
    """A few training samples of any data source as a normalised batch, for start-up checks.

    Args:
        source: a data module with ``example_batch()`` (the library's: already transformed
            like a training batch), else anything with ``train_dataloader()`` (any
            LightningDataModule: its first training batch, passed through its
            ``on_before_batch_transfer``/``on_after_batch_transfer`` hooks), or a DataLoader /
            iterable of batches (its first batch).
        size: samples to keep (``None``: the whole first batch).

    Raises:
        ValueError: the source yields no batch (an empty training set), naming the fix.
    """
    if hasattr(source, "example_batch"):
        batch = _call_example_batch(source, size)
    else:
        loader = source.train_dataloader() if hasattr(source, "train_dataloader") else source
        batch = _first_batch(loader, type(source).__name__)
        for hook in ("on_before_batch_transfer", "on_after_batch_transfer"):
            if hasattr(source, hook):
                batch = getattr(source, hook)(batch, 0)
    batch = normalise_batch(batch)
    return batch if size is None else slice_batch(batch, size)


def _first_batch(loader: Any, name: str) -> Any:
    try:
        return next(iter(loader))
    except StopIteration:
        iterable = isinstance(getattr(loader, "dataset", None), IterableDataset)
        raise ValueError(
            f"the training data of {name} yields no batch: the training set is empty (check the "
            "data path, the split and any filtering"
            + ("; here an IterableDataset whose __iter__ yields no sample" if iterable else "")
            + "), or drop_last removes the only, incomplete batch (use a smaller batch_size)"
        ) from None


def check_loader_not_empty(loader: Any) -> None:
    """Refuse, before the first step, a training loader of unknown length that yields nothing.

    A loader with a length (a map-style dataset) says it is empty without being read (Lightning
    then runs no step, and the fit says so). An iterable one (``IterableDataset``) would run an
    epoch of zero steps and exit as if trained: its first batch is drawn here once and thrown
    away (the only way to know; the caller restores the random generators it draws from).

    Raises:
        ValueError: the loader yields no batch, naming the fix.
    """
    if isinstance(loader, (list, tuple, Mapping)):  # several loaders: Lightning's business
        return
    try:
        len(loader)
        return
    except TypeError:
        _first_batch(loader, type(loader).__name__)


def _one_hot_like(target: torch.Tensor, num_classes: int | None) -> bool:
    if (
        target.dim() != 2
        or num_classes is None
        or target.shape[-1] != num_classes
        or not target.numel()
    ):
        return False
    values = target.float()
    binary = bool(((values == 0) | (values == 1)).all())
    return binary and bool((values.sum(dim=-1) == 1).all())


def check_targets(target: Any, num_classes: int | None, where: str = "the labels") -> None:
    """Start-up check of class labels: long dtype, values in ``0..num_classes-1`` or ignored.

    Args:
        target: the labels of a split or a batch, ``(N,)`` (or ``(N, L)`` per token).
        num_classes: number of classes (``None``: the range is not checked).
        where: what the labels are, for the message (e.g. ``"the train split"``).

    Raises:
        TypeError: not a tensor, float/bool labels, one-hot or soft labels, another integer
            dtype; each message names the fix.
        ValueError: labels outside ``0..num_classes-1`` and not an ignore value (``-1``,
            ``-100``), naming the values found and the fix.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"{where} must be a tensor of class indices, got {type(target).__name__}: return "
            "torch.tensor(label) (or torch.long tensors) from your dataset"
        )
    if target.dim() == 2 and target.shape[-1] == 1:
        convert = "" if target.dtype == torch.long else " and convert them with .long()"
        raise TypeError(
            f"{where} have shape {tuple(target.shape)} ({target.dtype}); class labels must be "
            "(B,) class indices, one per sample: squeeze the last dimension (target.squeeze(-1)"
            f", or return a scalar label per sample from your dataset){convert}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        if target.dim() == 2 and target.shape[-1] > 1:  # a value per class
            raise TypeError(
                f"{where} are one-hot or soft labels ({target.dtype}, shape "
                f"{tuple(target.shape)}); the library needs class indices: use "
                "target.argmax(-1).long() (soft targets from a teacher are teacher outputs, "
                "not labels)"
            )
        raise TypeError(
            f"{where} have dtype {target.dtype}; class labels must be integer class indices "
            "of dtype torch.long: convert them with .long() in your dataset"
        )
    if target.dtype != torch.long:
        raise TypeError(
            f"{where} have dtype {target.dtype}; class labels must be torch.long (int64), as the "
            "cross-entropy and accuracy need: convert them with .long() in your dataset"
        )
    if _one_hot_like(target, num_classes) and num_classes > 2:
        raise TypeError(
            f"{where} look one-hot (shape {tuple(target.shape)}, one 1 per row); the library "
            "needs class indices: use target.argmax(-1)"
        )
    if num_classes is None or not target.numel():
        return
    ignored = torch.zeros_like(target, dtype=torch.bool)
    for value in IGNORE_VALUES:
        ignored |= target == value
    bad = ~ignored & ((target < 0) | (target >= num_classes))
    if not bad.any():
        return
    values = target[bad].unique()
    shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    labeled = target[~ignored]
    hint = (
        f"; the labels look 1-based ({int(labeled.min())}..{int(labeled.max())}): subtract 1"
        if int(labeled.min()) == 1 and int(labeled.max()) == num_classes
        else f"; if the task has {int(labeled.max()) + 1} classes, set num_classes to that"
        if int(labeled.min()) >= 0
        else ""
    )
    raise ValueError(
        f"{where} contain {shown}, outside the valid range 0..{num_classes - 1} for "
        f"num_classes={num_classes} (unlabeled samples use {IGNORE_INDEX}, masked tokens "
        f"{TOKEN_IGNORE_INDEX}){hint}"
    )


def check_not_empty(count: int, where: str, fix: str) -> None:
    """Refuse an empty split at set-up, before any step, with the fix."""
    if count == 0:
        raise ValueError(f"{where} is empty: {fix}")


class InvalidTargets(ValueError):
    """Labels of a batch after the first are not class indices of the task."""


def invalid_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean mask of labels outside ``0..num_classes-1`` that are not an ignore value
    (elementwise on the target's device: no host sync)."""
    ignored = torch.zeros_like(target, dtype=torch.bool)
    for value in IGNORE_VALUES:
        ignored |= target == value
    return ~ignored & ((target < 0) | (target >= num_classes))


class TargetGuard:
    """The label check of every batch after the example one, without a host sync per step.

    The example batch is checked at start-up (:func:`check_targets`); a user's data module or
    DataLoader may still hold bad labels only in later batches, where the loss would fail with a
    raw ``IndexError`` (CPU) or a device-side assert that ends the process (CUDA). What is
    checked, per batch:

    - type, dtype and rank (tensor metadata, free everywhere): float, bool, another integer
      dtype or a rank other than the example's (one-hot labels) raise at once;
    - the range, on CPU tensors: at once, with the values (reading a CPU tensor costs no sync);
    - the range, on an accelerator: a device-side mask replaces each bad label with the ignore
      value (so no kernel asserts) and records the batch and the bad values in device tensors;
      :meth:`raise_if_tripped` raises where the non-finite guard already reads its flags
      (:mod:`kd_lightning.methods.nonfinite`: every ``log_every_n_steps`` steps, every epoch end,
      before every checkpoint), so no checkpoint is written after a bad batch.
    """

    def __init__(self) -> None:
        self.example_dim: int | None = None
        self.num_classes: int | None = None
        self.tripped: torch.Tensor | None = None  # bool: a bad label was seen
        self.found: torch.Tensor | None = None  # long [batch, low, high] of the first bad batch
        self.stage = ""

    def expect(self, target: Any) -> None:
        """Record the example's target rank (after :func:`check_targets` accepted it)."""
        self.example_dim = target.dim() if isinstance(target, torch.Tensor) else None

    def screen(
        self,
        target: Any,
        num_classes: int | None,
        batch_idx: int | None,
        stage: str,
        defer: bool | None = None,
    ) -> Any:
        """Check one batch's labels; returns the labels the step may use (see the class).

        ``defer`` chooses the accelerator path (mask now, raise at the next read); ``None``:
        for any tensor not on the CPU.

        Raises:
            TypeError: not a tensor, float/bool/int32 labels, or another rank than the example's.
            InvalidTargets: out-of-range labels of a CPU batch (the values, the class count and
                the fix).
        """
        if target is None and self.example_dim is None:
            return target  # unlabeled data throughout (checked at start-up)
        where = f"the labels of {stage} batch {batch_idx if batch_idx is not None else '?'}"
        if not isinstance(target, torch.Tensor) or target.dtype != torch.long:
            check_targets(target, num_classes, where)  # raises, naming the dtype and the fix
        if self.example_dim is not None and target.dim() != self.example_dim:
            raise TypeError(
                f"{where} have shape {tuple(target.shape)} but the first batch's labels had "
                f"{self.example_dim} dimension(s): every batch must hold class indices of one "
                "shape, (B,) class indices (labels shaped (B, 1): target.squeeze(-1); "
                "one-hot labels: target.argmax(-1))"
            )
        if num_classes is None or not target.numel():
            return target
        if not (target.device.type != "cpu" if defer is None else defer):
            try:
                check_targets(target, num_classes, where)
            except ValueError as err:
                raise InvalidTargets(f"{err}. {LATER_BATCH_FIX}") from None
            return target
        bad = invalid_targets(target, num_classes)
        self._record(bad, target, num_classes, batch_idx, stage)
        fill = IGNORE_INDEX if target.dim() == 1 else TOKEN_IGNORE_INDEX
        return torch.where(bad, torch.full_like(target, fill), target)

    def _record(
        self, bad: torch.Tensor, target: torch.Tensor, num_classes: int, batch_idx, stage
    ) -> None:
        any_bad = bad.any()
        big = torch.iinfo(torch.long).max
        low = torch.where(bad, target, torch.full_like(target, big)).min()
        high = torch.where(bad, target, torch.full_like(target, -big)).max()
        index = torch.full((), -1 if batch_idx is None else batch_idx, device=target.device)
        found = torch.stack([index, low, high])
        if self.tripped is None or self.tripped.device != bad.device:
            self.tripped = torch.zeros((), dtype=torch.bool, device=bad.device)
            self.found = torch.zeros(3, dtype=torch.long, device=bad.device)
        first = any_bad & ~self.tripped  # keep the first bad batch
        self.found = torch.where(first, found, self.found)
        self.tripped = self.tripped | any_bad
        self.num_classes = num_classes
        self.stage = stage

    def raise_if_tripped(self) -> None:
        """Raise for the first bad batch recorded on an accelerator (one host sync)."""
        if self.tripped is None or not bool(self.tripped):
            return
        batch, low, high = (int(v) for v in self.found.tolist())
        values = str(low) if low == high else f"values from {low} to {high}"
        raise InvalidTargets(
            f"the labels of batch {batch} (a later {self.stage} batch) contain {values}, outside "
            f"the valid range 0..{self.num_classes - 1} for num_classes={self.num_classes} "
            f"(unlabeled samples use {IGNORE_INDEX}, masked tokens {TOKEN_IGNORE_INDEX}); they "
            f"were left out of the loss until this check, and no checkpoint is written. "
            + LATER_BATCH_FIX
        )


LATER_BATCH_FIX = (
    "The first batch was valid: the data holds bad labels further in. Fix the dataset's labels "
    "(every label must be a class index 0..num_classes-1), or set num_classes to the number of "
    "classes the labels use"
)
