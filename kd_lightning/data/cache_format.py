"""What a teacher-cache file holds and how it is read: provenance, identity, split readers.

The file is a :mod:`kd_lightning.container` file of format ``kd_lightning.teacher_cache``.
Arrays per cached split (``rows`` samples of the split, ``views`` augmented views each):

- dense: ``<split>/logits`` ``(rows, views, C)``;
- top-k: ``<split>/values`` ``(rows, views, k)`` log-probabilities at the recorded temperature
  under the full softmax (the tail's mass ``1 - sum(exp(values))`` is implied, not
  renormalised away: ``tail = "rest_mass"``) and ``<split>/indices`` (int16 or int32);
- ``<split>/keys`` ``(rows,)`` uint64, for data modules whose batches carry no ``index``: a
  digest of each sample's input, so batches in any order find their rows.

The header records the provenance (:class:`CacheProvenance`): the teacher's digests, what data
and transforms the outputs were made from, and the storage kind, dtype, top-k, temperature and
tail handling. ``granularity`` is ``"sample"``; a per-token cache for language models would
store ``(tokens, k)`` rows with per-sequence offsets under ``granularity = "token"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.container import ArraySpec, as_tensor
from kd_lightning.data.batch import TEACHER_LOGITS, TEACHER_TOPK_INDICES, TEACHER_TOPK_VALUES
from kd_lightning.digest import module_digest

FORMAT = "kd_lightning.teacher_cache"
FORMAT_VERSION = 2
TAIL = "rest_mass"
"""Top-k tail handling: values are full-softmax log-probabilities; the rest's mass is implied."""

#: Storage dtypes of the values: torch dtype written to the file.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ON_MISMATCH = ("rebuild", "error")

#: Header fields that say what the cache was made from; a difference on load invalidates it.
IDENTITY_FIELDS = (
    "teacher_digest",
    "data",
    "transform",
    "views",
    "seed",
    "kind",
    "dtype",
    "topk",
    "temperature",
    "tail",
    "granularity",
    "num_classes",
)


class TeacherCacheError(RuntimeError):
    """A teacher cache that cannot be used (and cannot be rebuilt); the message says why and how to fix it."""


class InvalidCacheFile(TeacherCacheError):
    """The file is missing, truncated, corrupt, or was made from something else.

    Attributes:
        reasons: one line per problem found (``"teacher_digest: the file has ..., this run
            expects ..."``).
    """

    def __init__(self, path: Path, reasons: list[str]) -> None:
        self.path, self.reasons = path, reasons
        super().__init__(f"{path}: " + "; ".join(reasons))


def compare_identity(header: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per identity field whose value differs between a file's header and this run.

    A field this run cannot know (``None``: no teacher at hand, a data module without
    ``num_classes``) is not compared: the recorded value is trusted.
    """
    reasons = []
    for field in IDENTITY_FIELDS:
        if field in ("teacher_digest", "num_classes") and expected.get(field) is None:
            continue
        have, want = header.get(field), expected.get(field)
        if have != want:
            why = {
                "teacher_digest": " (the teacher checkpoint changed since the cache was built)",
                "data": " (the transfer set's inputs changed)",
            }.get(field, "")
            reasons.append(f"{field}: the file has {have!r}, this run expects {want!r}{why}")
    return reasons


@dataclasses.dataclass(frozen=True)
class CacheProvenance:
    """What a cache file was made from: check it against the run before any step.

    Attributes:
        path: the cache file.
        teacher_digest: identity of the teacher as it was given: SHA-256 of its checkpoint file,
            or :func:`~kd_lightning.digest.module_digest` of a module.
        teacher_module_digest: :func:`~kd_lightning.digest.module_digest` of the network that
            made the outputs (compare with the digest of a configured teacher).
        teacher_source: the checkpoint path or the teacher's class.
        kind: ``"dense"`` (logits) or ``"topk"`` (log-probabilities of the k largest classes).
        temperature: temperature of the stored top-k log-probabilities; ``None`` for dense
            logits (raw logits suit any temperature).
        topk: k, or ``None`` for dense.
        tail: top-k tail handling (``"rest_mass"``), ``None`` for dense.
        dtype: storage dtype of the values.
        num_classes: width of the teacher's output.
        views: augmented views stored per training sample.
        seed: seed of the views' augmentation parameters.
        granularity: ``"sample"`` (one output per sample).
        splits: the cached splits.
    """

    path: str
    teacher_digest: str | None
    teacher_module_digest: str | None
    teacher_source: str | None
    kind: str
    temperature: float | None
    topk: int | None
    tail: str | None
    dtype: str
    num_classes: int | None
    views: int
    seed: int
    granularity: str
    splits: tuple[str, ...]

    @classmethod
    def from_header(cls, path: str | Path, header: dict[str, Any]) -> CacheProvenance:
        return cls(
            path=str(path),
            teacher_digest=header.get("teacher_digest"),
            teacher_module_digest=header.get("teacher_module_digest"),
            teacher_source=header.get("teacher_source"),
            kind=header["kind"],
            temperature=header.get("temperature"),
            topk=header.get("topk"),
            tail=header.get("tail"),
            dtype=header["dtype"],
            num_classes=header.get("num_classes"),
            views=header["views"],
            seed=header["seed"],
            granularity=header.get("granularity", "sample"),
            splits=tuple(s for s in ("train", "val", "test") if s in header["data"]),
        )

    def check_temperature(self, temperature: float, where: str = "the loss") -> None:
        """Refuse a loss temperature other than the one a top-k cache was stored at.

        Dense logits are raw and suit any temperature. Top-k values are log-probabilities at the
        stored temperature: reading them at another gives a wrong loss with no error.

        Raises:
            TeacherCacheError: naming both temperatures and the two fixes.
        """
        if self.kind != "topk" or self.temperature is None:
            return
        if not np.isclose(float(temperature), float(self.temperature), rtol=1e-6, atol=0.0):
            raise TeacherCacheError(
                f"the teacher cache {self.path} stores top-{self.topk} log-probabilities at "
                f"temperature {self.temperature:g}, but {where} uses temperature "
                f"{float(temperature):g}: set the loss temperature to {self.temperature:g}, or "
                f"rebuild the cache with temperature: {float(temperature):g}"
            )

    def check_teacher(self, teacher: nn.Module | str) -> None:
        """Refuse a configured teacher other than the one the cache was made from.

        Args:
            teacher: the configured teacher (its :func:`module_digest` is compared with the
                recorded one), or a digest.

        Raises:
            TeacherCacheError: naming both digests and the fix.
        """
        if self.teacher_module_digest is None:
            return
        digest = teacher if isinstance(teacher, str) else module_digest(teacher)
        if digest != self.teacher_module_digest:
            raise TeacherCacheError(
                f"the teacher cache {self.path} was made by the teacher with digest "
                f"{self.teacher_module_digest} ({self.teacher_source}), but the configured "
                f"teacher has digest {digest}: configure the teacher the cache was built from, "
                "or rebuild the cache from this teacher (delete the file or point "
                "teacher_cache.path elsewhere)"
            )


# ------------------------------------------------------------------------- sample keys


def _sample_bytes(value: torch.Tensor, row: int, mask: torch.Tensor | None) -> bytes:
    sample = value[row]
    if mask is not None and sample.dim() >= 1 and sample.shape[0] == mask.shape[1]:
        sample = sample[mask[row].bool().cpu()]  # padding is not part of the sample
    sample = sample.detach().cpu().contiguous()
    return (
        f"{sample.dtype}{tuple(sample.shape)}".encode()
        + sample.flatten().view(torch.uint8).numpy().tobytes()
    )


def sample_keys(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> np.ndarray:
    """A 64-bit digest of each sample's input: ``(B,)`` uint64.

    For a dict input every tensor entry counts (by name); with an ``attention_mask`` the padded
    positions are left out, so a sample has one key whatever it was padded to.
    """
    entries = dict(inputs) if isinstance(inputs, Mapping) else {"": inputs}
    tensors = {k: v for k, v in sorted(entries.items()) if isinstance(v, torch.Tensor)}
    mask = tensors.get("attention_mask")
    rows = next(iter(tensors.values())).shape[0]
    keys = np.empty(rows, dtype=np.uint64)
    for row in range(rows):
        digest = hashlib.blake2b(digest_size=8)
        for name, value in tensors.items():
            digest.update(name.encode())
            digest.update(_sample_bytes(value, row, mask))
        keys[row] = int.from_bytes(digest.digest(), "little")
    return keys


# ------------------------------------------------------------------------- split readers


class SplitOutputs:
    """Cached teacher outputs of one split, read lazily through a memory map.

    Pickles as its path and layout only (DataLoader workers reopen the map), not the data.

    Args:
        path: the cache file.
        arrays: ``{"logits": spec}`` (dense) or ``{"values": spec, "indices": spec}`` (top-k),
            plus ``{"keys": spec}`` when the split has sample keys.
        storage_dtype: name in :data:`STORAGE_DTYPES` of the values.
    """

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], storage_dtype: str) -> None:
        self.path, self.arrays, self.storage_dtype = path, arrays, storage_dtype
        self._maps: dict[str, np.ndarray] | None = None
        self._key_order: tuple[np.ndarray, np.ndarray] | None = None
        first = arrays.get("logits") or arrays["values"]
        self.rows, self.views = first.shape[0], first.shape[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_key_order": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            # Copy-on-write: torch gets writable arrays without ever touching the file.
            self._maps = {
                name: np.memmap(
                    self.path, dtype=spec.dtype, mode="c", offset=spec.offset, shape=spec.shape
                )
                for name, spec in self.arrays.items()
                if spec.nbytes
            }
        return self._maps

    def _values(self, name: str, raw: np.ndarray) -> torch.Tensor:
        return as_tensor(raw, self.arrays[name]).float()

    def lookup(self, indices: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch entries for samples ``indices`` (rows of the split) seen as ``views``."""
        maps = self._open()
        rows, cols = indices.cpu().numpy(), views.cpu().numpy()
        if "logits" in self.arrays:
            return {TEACHER_LOGITS: self._values("logits", maps["logits"][rows, cols])}
        return {
            TEACHER_TOPK_VALUES: self._values("values", maps["values"][rows, cols]),
            TEACHER_TOPK_INDICES: torch.from_numpy(maps["indices"][rows, cols].astype(np.int64)),
        }

    def rows_of(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The rows whose stored sample keys equal the keys of ``inputs`` (batches without index).

        Raises:
            TeacherCacheError: the split has no keys, or an input is not in the cache.
        """
        if "keys" not in self.arrays:
            raise TeacherCacheError(
                f"the teacher cache {self.path} was built from a data module whose batches carry "
                "'index', but this batch has none: use the same data module as for the build"
            )
        if self._key_order is None:
            keys = np.asarray(self._open()["keys"])
            order = np.argsort(keys, kind="stable")
            self._key_order = (keys[order], order)
        sorted_keys, order = self._key_order
        wanted = sample_keys(inputs)
        found = np.searchsorted(sorted_keys, wanted).clip(max=len(sorted_keys) - 1)
        missing = sorted_keys[found] != wanted
        if missing.any():
            raise TeacherCacheError(
                f"{int(missing.sum())} of {len(wanted)} samples of this batch are not in the "
                f"teacher cache {self.path}: the data, its order-independent content or its "
                "augmentation changed since the build. Rebuild the cache, turn random "
                "augmentation off, or give batches an 'index' (wrap your dataset in "
                "kd_lightning.data.TransferSet)"
            )
        return torch.from_numpy(order[found].astype(np.int64))

    def lookup_inputs(
        self, inputs: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Batch entries for samples found by the content of their inputs (one view)."""
        rows = self.rows_of(inputs)
        return self.lookup(rows, torch.zeros_like(rows))
