"""A synthesised transfer set in memory and on disk.

The file is a :mod:`kd_lightning.container` file (format ``kd_lightning.synthesised_set``):
three arrays (the inputs, the teacher's logits on them, the class each input was made for) and
a JSON header with the synthesis metadata (method, settings, the digest of the teacher that made
it) and a digest of the three tensors. It cannot carry code. Writes are atomic (temporary file in
the same folder, fsync, rename), so a crash never leaves a half-written set under the final
name. Loading checks the format, the payload checksums, the shapes and the digest, and says
what is wrong (and what to do) when a file is missing, truncated or altered.

Sets saved by earlier versions (a ``torch.save`` of plain tensors) are still read, with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kd_lightning.container import ContainerError, is_container, read_tensors, write_tensors
from kd_lightning.digest import module_digest, tensor_digest

FORMAT = "kd_lightning.synthesised_set"
VERSION = 2
LEGACY_VERSION = 1
"""Version of the ``torch.save`` files written before the shared container."""

tensors_digest = tensor_digest
"""The library's tensor digest (:func:`kd_lightning.digest.tensor_digest`)."""

__all__ = [
    "FORMAT",
    "VERSION",
    "SynthesisedSet",
    "SynthesisedSetError",
    "module_digest",
    "tensors_digest",
]


class SynthesisedSetError(ValueError):
    """A synthesised-set file that cannot be used (corrupt, truncated, wrong format or shapes)."""


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
        """:func:`~kd_lightning.digest.tensor_digest` of inputs, logits (float32) and classes (long)."""
        return tensor_digest(self.inputs, self.teacher_logits.float(), self.classes.long())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set atomically (temporary file + fsync + rename); returns the path."""
        tensors = {
            "inputs": self.inputs.detach().cpu(),
            "teacher_logits": self.teacher_logits.detach().cpu().float(),
            "classes": self.classes.detach().cpu().long(),
        }
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise SynthesisedSetError(
                f"the metadata of a synthesised set must be plain data (JSON: dicts, lists, "
                f"strings, numbers): {err}; convert tensors with .tolist()"
            ) from err
        header = {"digest": tensor_digest(*tensors.values()), "metadata": self.metadata}
        return write_tensors(path, tensors, header, FORMAT, VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SynthesisedSet:
        """Read a set written by :meth:`save`, verifying its format, checksums, shapes and digest."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"synthesised set {str(path)!r} does not exist: synthesise it first (train "
                "DataFreeDistillation with a synthesiser and this path, or call "
                "InputSynthesiser.synthesise(...).save(path))"
            )
        if is_container(path):
            try:
                header, tensors = read_tensors(path, FORMAT, VERSION)
            except ContainerError as err:
                raise SynthesisedSetError(_container_message(path, err)) from err
            payload = {
                **tensors,
                "digest": header.get("digest"),
                "metadata": header.get("metadata"),
            }
        else:
            payload = _load_legacy(path)
        missing = [
            k for k in ("inputs", "teacher_logits", "classes", "metadata") if k not in payload
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


def _container_message(path: Path, error: ContainerError) -> str:
    reasons = "; ".join(error.reasons)
    if any("is a " in r and "not a " in r for r in error.reasons):
        return f"{str(path)!r} is not a synthesised set ({reasons}); pass a file written by SynthesisedSet.save"
    if any("format version" in r for r in error.reasons):
        return f"{str(path)!r}: {reasons}; synthesise the set again"
    return (
        f"synthesised set {str(path)!r} is unreadable or corrupt ({reasons}); delete it and "
        "synthesise the set again"
    )


def _load_legacy(path: Path) -> dict[str, Any]:
    """A set written by version 1 (``torch.save`` of plain tensors), read without running code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure means the file is unusable
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise SynthesisedSetError(
                f"synthesised set {str(path)!r} holds Python objects beyond tensors and plain "
                "containers; loading it would run code from the file, so kd_lightning refuses "
                "it. Synthesise the set again (SynthesisedSet.save writes a format that cannot "
                "carry code)."
            ) from None
        raise SynthesisedSetError(
            f"synthesised set {str(path)!r} is unreadable (truncated or corrupt: "
            f"{type(err).__name__}: {err}); delete it and synthesise the set again"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SynthesisedSetError(
            f"{str(path)!r} is not a synthesised set (no {FORMAT!r} format tag); pass a file "
            "written by SynthesisedSet.save"
        )
    if payload.get("version") != LEGACY_VERSION:
        raise SynthesisedSetError(
            f"{str(path)!r} has format version {payload.get('version')}, this library reads "
            f"version {VERSION} (and {LEGACY_VERSION}); synthesise the set again"
        )
    if "digest" not in payload:
        raise SynthesisedSetError(f"{str(path)!r} lacks entries ['digest']; synthesise it again")
    return payload
