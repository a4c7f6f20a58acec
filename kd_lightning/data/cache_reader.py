"""Reading a teacher-cache file back: per-sample content keys and per-split readers.

The layout is described in :mod:`kd_lightning.data.cache_format`; this module finds the rows of
a batch (by ``index`` and ``view``, or by the content key of each sample) and returns them as
the batch entries the losses read (``teacher_logits`` or ``teacher_topk_values`` /
``teacher_topk_indices``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lightning.container import ArraySpec, as_tensor
from kd_lightning.data.batch import TEACHER_LOGITS, TEACHER_TOPK_INDICES, TEACHER_TOPK_VALUES
from kd_lightning.data.cache_format import TeacherCacheError

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
            plus ``{"offsets": spec}`` per token and ``{"keys": spec}`` when the split has
            sample keys.
        storage_dtype: name in :data:`STORAGE_DTYPES` of the values.
    """

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], storage_dtype: str) -> None:
        self.path, self.arrays, self.storage_dtype = path, arrays, storage_dtype
        self._maps: dict[str, np.ndarray] | None = None
        self._key_order: tuple[np.ndarray, np.ndarray] | None = None
        self.per_token = "offsets" in arrays
        if self.per_token:
            self.rows, self.views = arrays["offsets"].shape[0] - 1, 1
        else:
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

    def lookup(
        self, indices: torch.Tensor, views: torch.Tensor, length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch entries for samples ``indices`` (rows of the split) seen as ``views``.

        Per token, the entries are ``(B, L, k)`` with L the longest of these sequences, or
        ``length`` when that is larger (the batch's padded length).
        """
        maps = self._open()
        rows, cols = indices.cpu().numpy(), views.cpu().numpy()
        if self.per_token:
            return self._token_lookup(maps, rows, length)
        if "logits" in self.arrays:
            return {TEACHER_LOGITS: self._values("logits", maps["logits"][rows, cols])}
        return {
            TEACHER_TOPK_VALUES: self._values("values", maps["values"][rows, cols]),
            TEACHER_TOPK_INDICES: torch.from_numpy(maps["indices"][rows, cols].astype(np.int64)),
        }

    def _token_lookup(
        self, maps: dict[str, np.ndarray], rows: np.ndarray, length: int | None
    ) -> dict[str, torch.Tensor]:
        starts, stops = maps["offsets"][rows], maps["offsets"][rows + 1]
        lengths = torch.from_numpy((stops - starts).astype(np.int64))
        k = self.arrays["values"].shape[-1]
        longest = max(int(lengths.max()) if len(rows) else 0, length or 0)
        # Padding is a uniform top-k over distinct indices: a finite distribution.
        values = torch.full((len(rows), longest, k), -math.log(k))
        indices = torch.arange(k).expand(len(rows), longest, k).clone()
        real = torch.arange(longest) < lengths.unsqueeze(1)
        if len(rows):
            tokens = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
            values[real] = self._values("values", maps["values"][tokens])
            indices[real] = torch.from_numpy(maps["indices"][tokens].astype(np.int64))
        return {TEACHER_TOPK_VALUES: values, TEACHER_TOPK_INDICES: indices}

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
        self, inputs: torch.Tensor | Mapping[str, torch.Tensor], length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch entries for samples found by the content of their inputs (one view)."""
        rows = self.rows_of(inputs)
        return self.lookup(rows, torch.zeros_like(rows), length)
