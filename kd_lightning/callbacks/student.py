"""What the compression callbacks share: finding the student a method exports, and where it is."""

from __future__ import annotations

import lightning as L
from torch import nn

__all__ = ["student_of", "student_path"]


def student_of(pl_module: L.LightningModule) -> nn.Module:
    """The module's exported student (``pl_module.student``), with a clear error when it has none."""
    student = getattr(pl_module, "student", None)
    if not isinstance(student, nn.Module):
        raise ValueError(
            f"{type(pl_module).__name__} has no `student` module to compress; use a "
            "kd_lightning method (OfflineDistillation, Supervised, ...) or give the "
            "LightningModule a `student` attribute."
        )
    return student


def student_path(pl_module: L.LightningModule) -> str:
    """Attribute path of the student inside the module (``student``, ``model``, ``peers.1``)."""
    sources = getattr(pl_module, "sources", None)
    if isinstance(sources, dict) and hasattr(pl_module, "exported_name"):
        return sources[pl_module.exported_name]
    return "student"
