"""What the compression callbacks share: finding the student, keeping its checkpoint self-contained."""

from __future__ import annotations

import lightning as L
from torch import nn

from kd_lightning.models.from_checkpoint import is_from_checkpoint_spec
from kd_lightning.models.spec import model_spec

__all__ = ["STUDENT_ATTRIBUTE", "make_checkpoint_self_contained", "student_of"]

STUDENT_ATTRIBUTE = "student"
"""The attribute of a kd_lightning method that holds the student (what is compressed)."""


def student_of(pl_module: L.LightningModule) -> nn.Module:
    """The module's student (``pl_module.student``), with a clear error when it has none."""
    student = getattr(pl_module, STUDENT_ATTRIBUTE, None)
    if not isinstance(student, nn.Module):
        raise ValueError(
            f"{type(pl_module).__name__} has no `student` module to compress; use a "
            "kd_lightning method (OfflineDistillation, Supervised, ...) or give the "
            "LightningModule a `student` attribute."
        )
    return student


def make_checkpoint_self_contained(pl_module: L.LightningModule) -> None:
    """Record the rebuilt student's own spec instead of a ``FromCheckpoint`` spec.

    A student started from another run's checkpoint would otherwise be rebuilt, on reload,
    by reading that other checkpoint again; after this, the compressed run's checkpoint
    rebuilds its student (an ``MLP``, a ``SmallCNN``, ...) from its own weights alone.
    """
    arg = getattr(pl_module, "student_arg", STUDENT_ATTRIBUTE)
    hparams = getattr(pl_module, "hparams", None)
    if hparams is None or not is_from_checkpoint_spec(hparams.get(arg)):
        return
    spec = model_spec(student_of(pl_module))
    if spec is not None:
        hparams[arg] = spec
