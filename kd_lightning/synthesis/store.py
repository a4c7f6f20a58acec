"""A synthesised transfer set in memory and on disk.

The file is a ``torch.save`` of plain tensors and plain metadata (loadable with
``weights_only=True``): the inputs, the teacher's logits on them, the class each input was made
for, a digest of those three tensors, and the synthesis metadata (method, settings, the digest
of the teacher that made it). Writes are atomic: the data goes to a temporary file in the same
folder, is flushed to disk, and only then renamed over the destination, so a crash never leaves
a half-written set under the final name. Loading checks the format tag, the shapes and the
digest, and says what is wrong (and what to do) when a file is missing, truncated or altered.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.teachers import FrozenTeacher

FORMAT = "kd_lightning.synthesised_set"
VERSION = 1


class SynthesisedSetError(ValueError):
    """A synthesised-set file that cannot be used (corrupt, truncated, wrong format or shapes)."""


def _update(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.flatten().view(torch.uint8).numpy())


def tensors_digest(*tensors: torch.Tensor) -> str:
    """``sha256:<hex>`` over the dtypes, shapes and bytes of ``tensors``."""
    digest = hashlib.sha256()
    for tensor in tensors:
        _update(digest, tensor)
    return "sha256:" + digest.hexdigest()


def module_digest(module: nn.Module) -> str:
    """``sha256:<hex>`` over a module's state dict (names, dtypes, shapes, bytes).

    A :class:`~kd_lightning.teachers.FrozenTeacher` and the network it wraps have the same
    digest, so a set made from either is recognised as made by that teacher.
    """
    if isinstance(module, FrozenTeacher):
        module = module.module
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        _update(digest, value)
    return "sha256:" + digest.hexdigest()


@dataclass
class SynthesisedSet:
    """Synthesised inputs with the teacher's outputs on them.

    Attributes:
        inputs: ``(N, *input_shape)`` float inputs, in the teacher's input space.
        teacher_logits: ``(N, C)`` float32 logits of the teacher on ``inputs`` (eval mode).
        classes: ``(N,)`` long: the class each input was synthesised for.
        metadata: plain data (method, settings, ``teacher_digest``, ...).
    """

    inputs: torch.Tensor
    teacher_logits: torch.Tensor
    classes: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.teacher_logits.dim() != 2 or self.teacher_logits.shape[0] != n:
            raise SynthesisedSetError(
                f"teacher_logits must have shape (N, C) with N={n} inputs, got "
                f"{tuple(self.teacher_logits.shape)}"
            )
        if tuple(self.classes.shape) != (n,):
            raise SynthesisedSetError(
                f"classes must have shape ({n},), got {tuple(self.classes.shape)}"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.teacher_logits.shape[1]

    @property
    def teacher_labels(self) -> torch.Tensor:
        """The teacher's top-1 class on each input."""
        return self.teacher_logits.argmax(dim=1)

    @property
    def teacher_digest(self) -> str | None:
        return self.metadata.get("teacher_digest")

    def digest(self) -> str:
        return tensors_digest(self.inputs, self.teacher_logits, self.classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set atomically (temporary file + fsync + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "inputs": self.inputs.detach().cpu().contiguous(),
            "teacher_logits": self.teacher_logits.detach().cpu().float().contiguous(),
            "classes": self.classes.detach().cpu().long().contiguous(),
            "digest": self.digest(),
            "metadata": self.metadata,
        }
        handle = tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
        try:
            with handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SynthesisedSet:
        """Read a set written by :meth:`save`, verifying its format, shapes and digest."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"synthesised set {str(path)!r} does not exist: synthesise it first (train "
                "DataFreeDistillation with a synthesiser and this path, or call "
                "InputSynthesiser.synthesise(...).save(path))"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any read failure means the file is unusable
            raise SynthesisedSetError(
                f"synthesised set {str(path)!r} is unreadable (truncated or corrupt: "
                f"{type(err).__name__}: {err}); delete it and synthesise the set again"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise SynthesisedSetError(
                f"{str(path)!r} is not a synthesised set (no {FORMAT!r} format tag); pass a file "
                "written by SynthesisedSet.save"
            )
        if payload.get("version") != VERSION:
            raise SynthesisedSetError(
                f"{str(path)!r} has format version {payload.get('version')}, this library reads "
                f"version {VERSION}; synthesise the set again"
            )
        missing = [
            k
            for k in ("inputs", "teacher_logits", "classes", "digest", "metadata")
            if k not in payload
        ]
        if missing:
            raise SynthesisedSetError(f"{str(path)!r} lacks entries {missing}; synthesise it again")
        try:
            loaded = cls(
                inputs=payload["inputs"],
                teacher_logits=payload["teacher_logits"],
                classes=payload["classes"],
                metadata=payload["metadata"],
            )
        except SynthesisedSetError as err:
            raise SynthesisedSetError(f"{str(path)!r}: {err}") from err
        if loaded.digest() != payload["digest"]:
            raise SynthesisedSetError(
                f"synthesised set {str(path)!r} is corrupt: its tensors do not match the digest "
                "recorded when it was written; delete it and synthesise the set again"
            )
        return loaded
