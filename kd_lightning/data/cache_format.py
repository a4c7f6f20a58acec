"""What a teacher-cache file holds and how it is read: provenance, identity, split readers.

The file is a :mod:`kd_lightning.container` file of format ``kd_lightning.teacher_cache``.
Arrays per cached split (``rows`` samples of the split, ``views`` augmented views each):

- dense: ``<split>/logits`` ``(rows, views, C)``;
- top-k: ``<split>/values`` ``(rows, views, k)`` log-probabilities at the recorded temperature
  under the full softmax (the tail's mass ``1 - sum(exp(values))`` is implied, not
  renormalised away: ``tail = "rest_mass"``) and ``<split>/indices`` (int16 or int32);
- per token (``granularity = "token"``, language models, top-k only): ``<split>/values`` and
  ``<split>/indices`` ``(tokens, k)`` for every real token (attention mask 1) of every sequence,
  sequences one after the other, and ``<split>/offsets`` ``(rows + 1,)`` int64: sequence ``i``
  is tokens ``offsets[i]:offsets[i + 1]``, positions ``0..n_i - 1`` (right padding). Positions
  are stored unshifted: position t holds the teacher's distribution there, which for a causal
  LM predicts token t + 1; the token losses apply the next-token shift exactly as they do to
  dense logits. Read back, a batch gets ``(B, L, k)`` tensors padded to its longest sequence;
  padded positions hold a uniform top-k (finite; the losses drop them by the attention mask);
- ``<split>/keys`` ``(rows,)`` uint64, for data modules whose batches carry no ``index``: a
  digest of each sample's input, so batches in any order find their rows.

The header records the provenance (:class:`CacheProvenance`): the teacher's digests, what data
and transforms the outputs were made from, and the storage kind, dtype, top-k, temperature,
tail handling and granularity (``"sample"`` or ``"token"``), plus ``stored_values``, which says
in words what the values are (raw logits, or log-probabilities at the temperature).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.container import (
    ArraySpec,
    ContainerError,
    ContainerWriter,
    as_tensor,
    to_numpy,
)
from kd_lightning.container import read_header as _read_container_header
from kd_lightning.data.batch import TEACHER_LOGITS, TEACHER_TOPK_INDICES, TEACHER_TOPK_VALUES
from kd_lightning.digest import module_digest
from kd_lightning.functional.sparse_soft_target import topk_log_probs

FORMAT = "kd_lightning.teacher_cache"
FORMAT_VERSION = 2
TAIL = "rest_mass"
"""Top-k tail handling: values are full-softmax log-probabilities; the rest's mass is implied."""
GRANULARITIES = ("sample", "token")
"""One output per sample (classification), or one per token (language models, top-k)."""

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


def read_header(path: str | Path) -> dict[str, Any]:
    """Read and check the structure of a teacher-cache file (not the payload checksums).

    Raises:
        InvalidCacheFile: missing, truncated, corrupt, not a teacher cache, or another version.
    """
    try:
        return _read_container_header(path, FORMAT, FORMAT_VERSION)
    except ContainerError as error:
        raise InvalidCacheFile(Path(path), error.reasons) from None


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
        granularity: ``"sample"`` (one output per sample) or ``"token"`` (one per token).
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

    def check_topk(self, topk: int | None, where: str = "the loss") -> None:
        """Refuse a loss that expects another k than the top-k cache stores (``None``: any k).

        Raises:
            TeacherCacheError: naming both k and the two fixes.
        """
        if topk is None or self.kind != "topk" or self.topk is None or int(topk) == self.topk:
            return
        raise TeacherCacheError(
            f"the teacher cache {self.path} stores the top-{self.topk} log-probabilities per "
            f"{self.granularity}, but {where} expects topk={int(topk)}: set the loss's topk to "
            f"{self.topk} (or leave it unset), or rebuild the cache with topk: {int(topk)}"
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


def stored_values(topk: int | None, temperature: float) -> str:
    """What the stored values are, in words, for the header (``stored_values``)."""
    if not topk:
        return "raw logits (any temperature applies)"
    return (
        f"log_softmax(logits / {temperature:g}) of the top-{topk} entries (log-probabilities at "
        f"temperature {temperature:g} under the full softmax; the rest of the mass, 1 - "
        "sum(exp(values)), is the tail bucket)"
    )


def array_layout(
    expected: dict[str, Any],
    classes: int,
    dtype: str,
    topk: int | None,
    views_of: Callable[[str], int],
    keys: bool,
    lengths: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple]:
    """``{array name: (shape, dtype)}`` of a cache file (see the module docstring).

    Args:
        expected: the run's identity (its ``data`` gives the splits and their rows).
        classes: width of the teacher's output (vocabulary size per token).
        dtype: storage dtype name of the values.
        topk: k, or ``None`` for dense logits.
        views_of: views stored per sample of a split.
        keys: whether the splits get sample keys.
        lengths: real tokens per sequence by split, for a per-token cache.
    """
    storage = STORAGE_DTYPES[dtype]
    index_dtype = torch.int16 if classes <= np.iinfo(np.int16).max else torch.int32
    k = min(topk, classes) if topk else None
    arrays: dict[str, tuple] = {}
    for split, data in expected["data"].items():
        rows = data["rows"]
        if lengths is not None:
            tokens = int(lengths[split].sum())
            arrays[f"{split}/values"] = ((tokens, k), storage)
            arrays[f"{split}/indices"] = ((tokens, k), index_dtype)
            arrays[f"{split}/offsets"] = ((rows + 1,), torch.int64)
        elif k:
            arrays[f"{split}/values"] = ((rows, views_of(split), k), storage)
            arrays[f"{split}/indices"] = ((rows, views_of(split), k), index_dtype)
        else:
            arrays[f"{split}/logits"] = ((rows, views_of(split), classes), storage)
        if keys:
            arrays[f"{split}/keys"] = ((rows,), "<u8")
    return arrays


def write_outputs(
    writer: ContainerWriter,
    split: str,
    rows: torch.Tensor,
    place: tuple[int] | np.ndarray,
    logits: torch.Tensor,
    settings: tuple[str, int | None, float],
) -> None:
    """Store one teacher batch of ``split``: dense logits or their top-k log-probabilities.

    Args:
        writer: the open cache file.
        split: the split the rows belong to.
        rows: ``(B,)`` rows of the split.
        place: ``(view,)`` per sample; per token, the split's offsets (``(rows + 1,)``).
        logits: ``(B, C)`` per sample; per token, the real tokens' ``(n_1 + ... + n_B, V)`` in
            sequence order.
        settings: ``(dtype, topk, temperature)`` of the cache.

    Raises:
        TeacherCacheError: per token, a token count other than the first pass over the data.
    """
    dtype, topk, temperature = settings
    storage = STORAGE_DTYPES[dtype]
    rows = rows.cpu().numpy()
    if isinstance(place, tuple):
        where: Any = (rows, place[0])
    else:
        if len(logits) != int((place[rows + 1] - place[rows]).sum()):
            raise TeacherCacheError(
                f"the {split} sequences changed length between two passes over the data (a "
                "per-token cache is sized by a first pass): make the data's batches deterministic"
            )
        where = np.concatenate([np.arange(place[r], place[r + 1]) for r in rows])
    if not topk:
        writer.array(f"{split}/logits")[where] = to_numpy(logits.to(storage))
        return
    values, indices = topk_log_probs(logits, topk, temperature)
    writer.array(f"{split}/values")[where] = to_numpy(values.to(storage))
    index_array = writer.array(f"{split}/indices")
    index_array[where] = indices.cpu().numpy().astype(index_array.dtype)


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
