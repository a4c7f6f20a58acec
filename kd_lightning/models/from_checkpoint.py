"""``FromCheckpoint``: a student initialised from the student of an earlier run.

Compression recipes start from a trained network: prune it and retrain it (distilling from the
unpruned model), or fine-tune it with fake quantization. In a config the student is then::

    student:
      class_path: kd_lightning.models.FromCheckpoint
      init_args: {checkpoint_path: runs/digits/distilled.ckpt}

and the teacher is often the very same checkpoint (``PretrainedTeacher``), so the retrained
student is distilled from its own unpruned self.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

SPEC_CLASS_PATH = "kd_lightning.models.FromCheckpoint"
"""``class_path`` of this class, for code that recognises its specs (see :func:`is_from_checkpoint_spec`)."""


class FromCheckpoint(nn.Module):
    """The student of a kd_lightning checkpoint, rebuilt with its weights, ready to train.

    Calling ``FromCheckpoint(path)`` returns the rebuilt network itself (an ``MLP``, a
    ``SmallCNN``, ...; train mode, trainable), not a wrapper: state-dict keys, hooked layer
    names and the recorded spec are those of the original architecture. Pruned students keep
    their masks (see :func:`kd_lightning.teachers.load_student`).

    Args:
        checkpoint_path: a ``.ckpt`` written by any kd_lightning method; it must record its
            student's spec (every zoo model and every CLI run does).
    """

    def __new__(cls, checkpoint_path: str | Path) -> Any:  # type: ignore[misc]
        from kd_lightning.teachers import load_student

        student = load_student(checkpoint_path).train()
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        return student

    def __init__(self, checkpoint_path: str | Path) -> None:  # pragma: no cover - never called
        super().__init__()


def is_from_checkpoint_spec(spec: Any) -> bool:
    """Whether a model spec (``class_path``/``init_args`` dict) builds a :class:`FromCheckpoint`."""
    return isinstance(spec, dict) and spec.get("class_path", spec.get("_class_path")) in (
        SPEC_CLASS_PATH,
        f"{__name__}.FromCheckpoint",
    )
