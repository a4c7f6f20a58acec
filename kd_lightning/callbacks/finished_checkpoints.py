"""Refuse, before any step, a fit that would replace a finished checkpoint of an earlier run.

Lightning's ``ModelCheckpoint`` never replaces a file while its version counter is on: with
``teacher.ckpt`` present it writes ``teacher-v1.ckpt``. A config that turns the counter off
(``enable_version_counter: false``, as the teacher configs do, so that distillation configs read
one stable ``teacher.ckpt``) makes every rerun write over that file: ``kd-lightning fit -c
experiments/digits/teacher.yaml --trainer.max_epochs=1`` would swap a trained teacher for a
one-epoch one, and a run that goes wrong would leave nothing to go back to.

:class:`KeepFinishedCheckpoints` (the CLI adds it to every ``fit``) looks, at fit start (after
set-up, before the sanity check and the first step), for files such a callback would write, and
refuses the run when one exists, unless replacing was asked for (``--overwrite``) or the fit
resumes from a checkpoint (``--ckpt_path``: continuing a run rewrites its files by design).

:class:`AtomicCheckpointIO` (the CLI installs it in place of Lightning's ``TorchCheckpointIO``)
writes each checkpoint to a temporary file beside the target, syncs it and renames it into place,
so an interrupted write never leaves half a file where a finished one was (Lightning's own writer
goes through the system's temporary folder, a copy when that is another file system). No
checkpoint of non-finite weights is written at all (:mod:`kd_lightning.methods.nonfinite`).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _pattern(template: str, extension: str) -> str:
    """A glob for the files a ``ModelCheckpoint`` filename template names (``{epoch}`` -> ``*``)."""
    parts = re.split(r"\{[^}]*\}", template)
    return "*".join(glob.escape(part) for part in parts) + extension


def fixed_name_files(callback: ModelCheckpoint) -> list[Path]:
    """Existing files ``callback`` would write over: those matching its filename (and ``last``)
    templates in its folder, when its version counter is off (else it never replaces a file)."""
    # ModelCheckpoint has no public accessor for the flag it was built with.
    if getattr(callback, "_enable_version_counter", True) or not callback.dirpath:
        return []
    templates = [callback.filename or "{epoch}-{step}"]
    if callback.save_last:
        templates.append(callback.CHECKPOINT_NAME_LAST)
    folder = Path(callback.dirpath)
    found: list[Path] = []
    for template in templates:
        found += sorted(folder.glob(_pattern(template, callback.FILE_EXTENSION)))
    return found


class KeepFinishedCheckpoints(Callback):
    """Refuse a fit whose checkpoint callbacks would write over an earlier run's checkpoint.

    Args:
        overwrite: replace such files (the earlier checkpoints are lost).

    Raises:
        FileExistsError: at fit start, naming the file and the three ways on (``--overwrite``,
            ``--ckpt_path`` to continue that run, another ``dirpath``).
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.overwrite or trainer.ckpt_path is not None:
            return
        found: list[str] = []
        if trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    found += [str(p) for p in fixed_name_files(callback)]
        found = trainer.strategy.broadcast(found)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise FileExistsError(
                f"{found[0]}{more} holds a checkpoint of an earlier run, and this fit would "
                "write over it (its ModelCheckpoint has a fixed file name and "
                "enable_version_counter: false). Nothing was trained. To replace it rerun with "
                f"--overwrite (Python: KeepFinishedCheckpoints(overwrite=True)); to continue that "
                f"run pass --ckpt_path {found[0]}; to keep both, give the ModelCheckpoint another "
                "dirpath or filename."
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on local paths: temporary file in the target's folder,
    ``fsync``, ``os.replace``. Remote paths (``s3://``, ...) and ``storage_options`` go to
    Lightning's writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
