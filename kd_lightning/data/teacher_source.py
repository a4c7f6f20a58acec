"""The teacher behind a file made from its outputs (a teacher cache, stored generations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_lightning.digest import file_digest, module_digest


class TeacherSource:
    """Mixin: a ``teacher`` module or a ``teacher_checkpoint`` path, and the teacher's identity.

    The class using it sets ``self.teacher`` (an ``nn.Module`` or None) and
    ``self.teacher_checkpoint`` (a path or None).
    """

    teacher: Any
    teacher_checkpoint: str | Path | None

    def teacher_available(self) -> bool:
        """Whether a teacher is at hand: a module, or a checkpoint file that exists."""
        if self.teacher is not None:
            return True
        return self.teacher_checkpoint is not None and Path(self.teacher_checkpoint).is_file()

    def teacher_digest(self) -> str | None:
        """The teacher's identity, or None when no teacher is at hand (the file is then trusted)."""
        if self.teacher is not None:
            return module_digest(self.teacher)
        if self.teacher_available():
            return file_digest(self.teacher_checkpoint)
        return None
