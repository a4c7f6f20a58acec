"""Which samples a data module puts in each split, recorded at fit and checked when a checkpoint
is evaluated.

``kd-lightning test --ckpt_path run.ckpt --data.init_args.split_seed=1`` (or another
``test_size``) would report accuracy on samples the checkpoint trained on. At fit, the method
writes the data module's *split identity* into the checkpoint's ``kd_lightning`` record: the
arguments that decide the splits (``split_seed``, ``val_size``/``test_size``, fractions,
``omit_classes``, ...) and a SHA-256 digest of the content of every evaluation split (its
inputs, labels and sample indices). Validating, testing, predicting or resuming from that
checkpoint compares the digest of each split it reads with the recorded one and refuses a
difference, naming the arguments that differ and the fix.

The library's transfer sets have a split identity
(:meth:`~kd_lightning.data.transfer_set.BaseTransferSetDataModule.split_identity`). Data
modules without one (a user's own ``LightningDataModule``, or a
:class:`~kd_lightning.data.DatasetTransferSet` given its datasets directly, whose splits the
user chose) are not checked: evaluating on new data is then the user's decision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLIT_ARGUMENTS = (
    "split_seed",
    "val_size",
    "test_size",
    "val_fraction",
    "test_fraction",
    "labeled_fraction",
    "omit_classes",
    "split_settings",
)
"""Attributes of a data module that decide (or describe) which samples are in which split."""

SPLITS_READ = {
    "fit": ("val", "test"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
"""The splits each trainer stage reads (``fit`` resumes: a changed val/test split would mean
training on samples the checkpoint held out, or the reverse)."""


class SplitMismatch(ValueError):
    """A checkpoint is evaluated on a split other than the one held out when it was trained."""


def plain(value: Any) -> Any:
    """``value`` as plain data a ``weights_only`` checkpoint load accepts (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8))
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (str, int, float, bool)):
        digest.update(repr(value).encode())


def split_digest(dataset: Any) -> str:
    """SHA-256 (16 hex digits) of a split's content: its inputs, labels and sample indices.

    Reads the in-memory tensors of the library's datasets (``inputs``, ``targets``,
    ``indices``; for a wrapped map-style dataset its labels, indices and tensor columns such as
    ``input_ids``); a dataset that keeps its samples elsewhere contributes its labels and size.
    """
    digest = hashlib.sha256(f"n={len(dataset)}".encode())
    for name in ("inputs", "targets", "all_targets", "indices"):
        _feed(digest, getattr(dataset, name, None))
    inner = getattr(dataset, "dataset", None)
    if inner is not None:
        for name in ("inputs", "input_ids", "data", "targets"):
            _feed(digest, getattr(inner, name, None))
    return digest.hexdigest()[:16]


def check_split_identity(
    recorded: dict[str, Any] | None, current: dict[str, Any] | None, stage: str, data: str = ""
) -> None:
    """Refuse evaluating (or resuming) a checkpoint on splits other than those of its fit.

    Args:
        recorded: the checkpoint's split identity (``None``: recorded before this check, or
            trained on data without one: nothing to compare).
        current: this run's data module's split identity (``None``: not checked).
        stage: the trainer stage (``fit``, ``validate``, ``test``, ``predict``).
        data: how to name this run's data module in the message.

    Raises:
        SplitMismatch: naming the split, the arguments at fit and now, both digests and the fix.
    """
    if not recorded or not current or recorded.get("data") != current.get("data"):
        return  # another data set altogether: nothing of its fit to compare with
    before, now = recorded.get("digests", {}), current.get("digests", {})
    changed = [
        s for s in SPLITS_READ.get(stage, ()) if s in before and s in now and before[s] != now[s]
    ]
    if not changed:
        return
    was, is_ = recorded.get("arguments", {}), current.get("arguments", {})
    differ = {k: (was.get(k), is_.get(k)) for k in sorted({*was, *is_}) if was.get(k) != is_.get(k)}
    name = data or str(current.get("data", "the data module")).rsplit(".", 1)[-1]
    if differ:
        what = "; ".join(f"{k}: {a!r} at fit, {b!r} now" for k, (a, b) in differ.items())
        fix = ", ".join(f"--data.init_args.{k}={a}" for k, (a, _) in differ.items())
        fix = f"give the data the checkpoint's split arguments ({fix}), or"
    else:
        what, fix = "same arguments, but the data itself changed", "restore that data, or"
    split = changed[0]
    raise SplitMismatch(
        f"the checkpoint was trained with other {name} splits ({what}): this run's {split} "
        f"split (digest {now[split]}) is not the one held out at fit ({before[split]}), so "
        f"{stage} would {'train on or ' if stage == 'fit' else ''}measure samples that may have "
        f"been in the training split. Fix: {fix} train a new checkpoint on these splits"
    )
