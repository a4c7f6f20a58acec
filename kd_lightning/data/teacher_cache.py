"""Teacher-output cache: run the teacher once over the transfer set, train from a file.

Offline distillation spends most of its compute on the teacher's forward pass although the
teacher never changes (Hinton et al. 2015 already note the soft targets can be precomputed).
:class:`TeacherCache` writes the teacher's outputs to one memory-mapped file; the transfer set
then puts them in every batch (``teacher_logits``, or ``teacher_topk_values`` /
``teacher_topk_indices``) and the teacher is neither run nor loaded during training.

Augmentation-aware (unlike caches keyed by sample index only): with a random training
augmentation the file stores ``views`` outputs per sample, view ``k`` of sample ``i`` being
the image whose augmentation parameters are drawn from ``(seed, i, k)``
(:func:`kd_lightning.data.augment.params_for`); training replays exactly those views, so a
cached output always belongs to the image the student sees.

File layout (one file, written atomically)::

    preamble   64 bytes: magic b"KDTCACHE", format version (uint32 LE), zeros
    payload    the arrays, each 64-byte aligned, C order
    header     JSON: provenance, array layout, CRC-32 of every payload chunk
    trailer    20 bytes: header length (uint64 LE), CRC-32 of the header (uint32 LE), b"KDTC_END"

The header records what the outputs were made from: the teacher's digest (SHA-256 of its
checkpoint file), a fingerprint of each cached split (SHA-256 of its inputs and targets), the
transform settings, views, seed, dtype, top-k and shapes. On load every field is compared with
the current run and every payload chunk is checked, so a changed teacher or data set, a flipped
byte or a truncated file is detected; the cache is then rebuilt when the teacher is available,
or refused with a message naming the mismatch and the fix.

Writes go to a temporary file in the same folder, are fsynced and then renamed over the final
path (``os.replace``): a writer killed mid-build leaves at most a temporary file, never a file
at ``path`` that would be accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import struct
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.functional.sparse_soft_target import topk_log_probs

if TYPE_CHECKING:  # pragma: no cover
    from kd_lightning.data.transfer_set import TransferSetDataModule

FORMAT_VERSION = 1
MAGIC = b"KDTCACHE"
END_MAGIC = b"KDTC_END"
PREAMBLE_SIZE = 64
TRAILER = struct.Struct("<QI8s")
ALIGNMENT = 64
CHUNK_SIZE = 1 << 22
"""Bytes per CRC-32 chunk of the payload (4 MiB)."""

#: Storage dtypes: numpy dtype on disk, torch dtype of the values. bfloat16 has no numpy dtype
#: and is stored as its raw 16 bits.
STORAGE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
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


# ----------------------------------------------------------------------------------- digests


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _update_with_tensor(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.flatten().view(torch.uint8).numpy())


def tensor_digest(*tensors: torch.Tensor) -> str:
    """``sha256:<hex>`` over the dtypes, shapes and bytes of ``tensors``."""
    digest = hashlib.sha256()
    for tensor in tensors:
        _update_with_tensor(digest, tensor)
    return "sha256:" + digest.hexdigest()


def module_digest(module: nn.Module) -> str:
    """``sha256:<hex>`` over a module's class and state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        _update_with_tensor(digest, value)
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------------ file format


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _preamble() -> bytes:
    return (MAGIC + struct.pack("<I", FORMAT_VERSION)).ljust(PREAMBLE_SIZE, b"\0")


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Where one payload array lives: byte offset in the file, shape and on-disk dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def plan_layout(arrays: dict[str, tuple[tuple[int, ...], str]]) -> tuple[dict[str, ArraySpec], int]:
    """Aligned offsets for named arrays ``{name: (shape, numpy dtype str)}``; returns (specs, payload end)."""
    specs: dict[str, ArraySpec] = {}
    offset = PREAMBLE_SIZE
    for name, (shape, dtype) in arrays.items():
        offset = _align(offset)
        specs[name] = ArraySpec(offset, tuple(int(s) for s in shape), np.dtype(dtype).str)
        offset += specs[name].nbytes
    return specs, offset


def _chunk_crcs(handle, start: int, end: int) -> list[int]:
    crcs = []
    handle.seek(start)
    position = start
    while position < end:
        block = handle.read(min(CHUNK_SIZE, end - position))
        if not block:
            break
        crcs.append(zlib.crc32(block))
        position += len(block)
    return crcs


def _temporary_path(path: Path) -> Path:
    host = socket.gethostname().replace(".", "-")
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of writers on this host that no longer run (killed mid-build)."""
    host = socket.gethostname().replace(".", "-")
    for candidate in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        try:
            pid = int(candidate.name[len(f".{path.name}.{host}.") :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


class AtomicCacheWriter:
    """Writes a cache file through a temporary file; only :meth:`commit` makes it appear at ``path``.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, a
    ``KeyboardInterrupt``) deletes the temporary file. A process killed with SIGKILL leaves the
    temporary file behind (never at ``path``); the next writer on the same host removes it.

    Args:
        path: final location of the cache.
        arrays: ``{name: (shape, numpy dtype)}`` of the payload.
    """

    def __init__(self, path: str | os.PathLike, arrays: dict[str, tuple[tuple[int, ...], str]]):
        self.path = Path(path)
        self.specs, self.payload_end = plan_layout(arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.path)
        self.temporary = _temporary_path(self.path)
        self._maps: dict[str, np.memmap] = {}
        self._committed = False

    def __enter__(self) -> AtomicCacheWriter:
        with open(self.temporary, "wb") as handle:
            handle.write(_preamble())
            handle.truncate(self.payload_end)
        for name, spec in self.specs.items():
            if spec.nbytes:
                self._maps[name] = np.memmap(
                    self.temporary,
                    dtype=spec.dtype,
                    mode="r+",
                    offset=spec.offset,
                    shape=spec.shape,
                )
        return self

    def array(self, name: str) -> np.memmap:
        """The writable memory map of one payload array."""
        return self._maps[name]

    def commit(self, header: dict[str, Any]) -> None:
        """Checksum the payload, append header and trailer, fsync, and rename into place."""
        for array in self._maps.values():
            array.flush()
        self._maps.clear()
        with open(self.temporary, "r+b") as handle:
            crcs = _chunk_crcs(handle, PREAMBLE_SIZE, self.payload_end)
            header = {
                **header,
                "format_version": FORMAT_VERSION,
                "arrays": {k: dataclasses.asdict(v) for k, v in self.specs.items()},
                "payload": {
                    "start": PREAMBLE_SIZE,
                    "end": self.payload_end,
                    "chunk_size": CHUNK_SIZE,
                    "crc32": crcs,
                },
            }
            encoded = json.dumps(header, sort_keys=True).encode()
            handle.seek(self.payload_end)
            handle.write(encoded)
            handle.write(TRAILER.pack(len(encoded), zlib.crc32(encoded), END_MAGIC))
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(self.temporary, self.path)
        self._committed = True
        try:  # make the rename itself durable
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError:  # pragma: no cover - platforms without directory fsync
            pass

    def __exit__(self, *exc_info: Any) -> None:
        self._maps.clear()
        if not self._committed:
            self.temporary.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the structure of a cache file (not the payload checksums).

    Raises:
        InvalidCacheFile: missing, truncated, wrong magic/version, or a corrupt header.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidCacheFile(path, ["the file does not exist"])
    size = path.stat().st_size
    if size < PREAMBLE_SIZE + TRAILER.size:
        raise InvalidCacheFile(path, [f"the file is truncated ({size} bytes)"])
    with open(path, "rb") as handle:
        preamble = handle.read(PREAMBLE_SIZE)
        handle.seek(size - TRAILER.size)
        header_length, header_crc, end_magic = TRAILER.unpack(handle.read(TRAILER.size))
        if preamble[: len(MAGIC)] != MAGIC:
            raise InvalidCacheFile(path, ["not a kd_lightning teacher cache (bad magic)"])
        if preamble != _preamble():
            version = struct.unpack("<I", preamble[len(MAGIC) : len(MAGIC) + 4])[0]
            detail = f"format version {version}, this library reads {FORMAT_VERSION}"
            raise InvalidCacheFile(path, [f"the preamble is corrupt or of another {detail}"])
        if end_magic != END_MAGIC:
            raise InvalidCacheFile(
                path, ["the file is truncated or was not completely written (no end marker)"]
            )
        header_start = size - TRAILER.size - header_length
        if header_start < PREAMBLE_SIZE:
            raise InvalidCacheFile(path, ["the trailer is corrupt (impossible header length)"])
        handle.seek(header_start)
        encoded = handle.read(header_length)
    if zlib.crc32(encoded) != header_crc:
        raise InvalidCacheFile(path, ["the header is corrupt (CRC-32 mismatch)"])
    header = json.loads(encoded)
    if header["payload"]["end"] != header_start:
        raise InvalidCacheFile(
            path, ["the file is truncated or has extra bytes (payload size mismatch)"]
        )
    return header


def verify_payload(path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Check every payload chunk against the CRC-32 recorded in the header.

    Raises:
        InvalidCacheFile: naming the first corrupt chunk's byte range.
    """
    path = Path(path)
    payload = header["payload"]
    if payload.get("chunk_size") != CHUNK_SIZE:
        raise InvalidCacheFile(path, ["the header records an unknown chunk size"])
    with open(path, "rb") as handle:
        crcs = _chunk_crcs(handle, payload["start"], payload["end"])
    if len(crcs) != len(payload["crc32"]):
        raise InvalidCacheFile(path, ["the payload is truncated"])
    for i, (actual, expected) in enumerate(zip(crcs, payload["crc32"], strict=True)):
        if actual != expected:
            start = payload["start"] + i * CHUNK_SIZE
            raise InvalidCacheFile(
                path,
                [f"the payload is corrupt: CRC-32 mismatch in bytes {start}..{start + CHUNK_SIZE}"],
            )


def compare_identity(header: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per identity field whose value differs between a file's header and this run."""
    reasons = []
    for field in IDENTITY_FIELDS:
        if field == "teacher_digest" and expected.get(field) is None:
            continue  # no teacher to compare with: the recorded teacher is trusted
        have, want = header.get(field), expected.get(field)
        if have != want:
            why = {
                "teacher_digest": " (the teacher checkpoint changed since the cache was built)",
                "data": " (the transfer set's inputs changed)",
            }.get(field, "")
            reasons.append(f"{field}: the file has {have!r}, this run expects {want!r}{why}")
    return reasons


# ---------------------------------------------------------------------------- reading views


class SplitOutputs:
    """Cached teacher outputs of one split, read lazily through a memory map.

    Pickles as its path and layout only (DataLoader workers reopen the map), not the data.

    Args:
        path: the cache file.
        arrays: ``{"logits": spec}`` (dense) or ``{"values": spec, "indices": spec}`` (top-k).
        storage_dtype: name in :data:`STORAGE_DTYPES` of the values.
    """

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], storage_dtype: str) -> None:
        self.path, self.arrays, self.storage_dtype = path, arrays, storage_dtype
        self._maps: dict[str, np.ndarray] | None = None
        first = next(iter(arrays.values()))
        self.rows, self.views = first.shape[0], first.shape[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            # Copy-on-write: torch gets writable arrays without ever touching the file.
            self._maps = {
                name: np.memmap(
                    self.path, dtype=spec.dtype, mode="c", offset=spec.offset, shape=spec.shape
                )
                for name, spec in self.arrays.items()
            }
        return self._maps

    def _values(self, raw: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(np.ascontiguousarray(raw))
        if self.storage_dtype == "bfloat16":
            values = values.view(torch.int16).view(torch.bfloat16)
        return values.float()

    def lookup(self, indices: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch entries for samples ``indices`` (rows of the split) seen as ``views``."""
        maps = self._open()
        rows, cols = indices.cpu().numpy(), views.cpu().numpy()
        if "logits" in maps:
            return {"teacher_logits": self._values(maps["logits"][rows, cols])}
        return {
            "teacher_topk_values": self._values(maps["values"][rows, cols]),
            "teacher_topk_indices": torch.from_numpy(maps["indices"][rows, cols].astype(np.int64)),
        }


# ------------------------------------------------------------------------------ the config


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TeacherCache:
    """Precompute a teacher's outputs over a transfer set once; train without the teacher.

    Attach it to any :class:`~kd_lightning.data.TransferSetDataModule` (``teacher_cache=``): the
    datamodule's ``prepare_data`` (one process per node) verifies the file or builds it, and
    ``setup`` (every process) opens it read-only. Batches then carry ``teacher_logits`` (dense)
    or ``teacher_topk_values`` / ``teacher_topk_indices`` (``topk``), so
    :class:`~kd_lightning.methods.OfflineDistillation` runs with ``teacher: null``.

    Args:
        path: the cache file (its folder is created).
        teacher_checkpoint: ``.ckpt`` of the teacher (loaded with
            :class:`~kd_lightning.teachers.PretrainedTeacher` only when the cache is built); its
            SHA-256 is the teacher's identity. When the file is absent (a machine without the
            teacher) a valid cache is used as it is, and an invalid one is refused.
        teacher: the teacher as a module instead of a checkpoint (Python use); its identity is
            the digest of its state dict.
        dtype: storage dtype of the values: ``float32``, ``float16`` or ``bfloat16``. Dense
            logits in float16 keep ~3 significant digits; float32 reproduces the live teacher.
        topk: store only the ``topk`` largest classes per sample (log-probabilities at
            ``temperature`` and class indices) instead of dense logits; use with
            :class:`~kd_lightning.losses.SparseSoftTargetKLLoss` at the same temperature.
        temperature: temperature of the stored top-k log-probabilities (top-k only).
        views: augmented views stored per training sample (K). Training sample ``i`` in epoch
            ``e`` replays view ``(e + h(i)) mod K``. Needs a datamodule with a random training
            augmentation when > 1.
        seed: seed of the views' augmentation parameters (``(seed, index, view)``).
        splits: splits to cache; caching ``val``/``test`` too lets validation run teacher-free.
        on_mismatch: ``rebuild`` (default) rebuilds a stale or corrupt file when the teacher is
            available; ``error`` always refuses it.
        batch_size: teacher batch size while building.
        device: device of the teacher while building (default: CUDA when available).
        progress: show a progress bar while building.
    """

    def __init__(
        self,
        path: str,
        teacher_checkpoint: str | None = None,
        teacher: nn.Module | None = None,
        dtype: str = "float16",
        topk: int | None = None,
        temperature: float = 4.0,
        views: int = 1,
        seed: int = 0,
        splits: Sequence[str] = ("train", "val", "test"),
        on_mismatch: str = "rebuild",
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {list(ON_MISMATCH)}, got {on_mismatch!r}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 (or None for dense logits), got {topk}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        bad = [s for s in splits if s not in ("train", "val", "test")]
        if bad or not splits:
            raise ValueError(f"splits must be a non-empty subset of train/val/test, got {splits}")
        if teacher_checkpoint is not None and teacher is not None:
            raise ValueError(
                "give the teacher either as teacher_checkpoint or as teacher, not both (to load a "
                "checkpoint into your own architecture pass teacher=PretrainedTeacher(path, model))"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher = teacher
        self.dtype = dtype
        self.topk = topk
        self.temperature = float(temperature)
        self.views = views
        self.seed = seed
        self.splits = tuple(dict.fromkeys(splits))
        self.on_mismatch = on_mismatch
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._verified: tuple | None = None

    def __repr__(self) -> str:
        kind = f"topk={self.topk}" if self.topk else "dense"
        return f"TeacherCache({str(self.path)!r}, {kind}, dtype={self.dtype}, views={self.views})"

    # ------------------------------------------------------------------ identity
    def teacher_available(self) -> bool:
        if self.teacher is not None:
            return True
        return self.teacher_checkpoint is not None and Path(self.teacher_checkpoint).is_file()

    def teacher_digest(self) -> str | None:
        """The teacher's identity, or None when no teacher is at hand (the file is then trusted)."""
        if self.teacher is not None:
            return module_digest(self.teacher)
        if self.teacher_checkpoint is not None and Path(self.teacher_checkpoint).is_file():
            return file_digest(self.teacher_checkpoint)
        return None

    def expected_identity(self, datamodule: TransferSetDataModule) -> dict[str, Any]:
        """What a valid file's header must say for this run."""
        data = {}
        for split in self.splits:
            inputs, targets = datamodule.raw_split(split)
            data[split] = {"fingerprint": tensor_digest(inputs, targets), "rows": len(targets)}
        return {
            "teacher_digest": self.teacher_digest(),
            "data": data,
            "transform": datamodule.transform_settings(),
            "views": self.views,
            "seed": self.seed,
            "kind": "topk" if self.topk else "dense",
            "dtype": self.dtype,
            "topk": self.topk,
            "temperature": self.temperature if self.topk else None,
            "num_classes": datamodule.num_classes,
        }

    def views_of(self, split: str) -> int:
        return self.views if split == "train" else 1

    # ------------------------------------------------------------------ load / build
    def _stamp(self) -> tuple:
        stat = self.path.stat()
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def check(self, expected: dict[str, Any]) -> dict[str, Any]:
        """The file's header if the file is intact and made from ``expected``; else raise InvalidCacheFile."""
        header = read_header(self.path)
        reasons = compare_identity(header, expected)
        if reasons:
            raise InvalidCacheFile(self.path, reasons)
        stamp = self._stamp()
        if self._verified != stamp:  # the payload CRCs are checked once per process
            verify_payload(self.path, header)
            self._verified = stamp
        return header

    def ensure(
        self, datamodule: TransferSetDataModule, *, may_build: bool = True
    ) -> dict[str, Any]:
        """Return the header of a valid cache for ``datamodule``, building it if needed and allowed.

        Raises:
            TeacherCacheError: the file is unusable and cannot (or may not) be rebuilt; the
                message lists what mismatched and how to fix it.
        """
        expected = self.expected_identity(datamodule)
        try:
            return self.check(expected)
        except InvalidCacheFile as invalid:
            problem = invalid
        missing = not self.path.exists()
        what = "does not exist" if missing else "cannot be used: " + "; ".join(problem.reasons)
        if not missing and self.on_mismatch == "error":
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}. on_mismatch='error' forbids rebuilding it: "
                "delete the file, point `path` elsewhere, or set on_mismatch: rebuild."
            ) from problem
        if not self.teacher_available():
            source = (
                f"the teacher checkpoint {self.teacher_checkpoint!r} does not exist"
                if self.teacher_checkpoint
                else "no teacher_checkpoint is set"
            )
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}, and it cannot be rebuilt because {source}. "
                "Fix: set teacher_cache.teacher_checkpoint to the teacher's .ckpt (the cache is "
                "then rebuilt), or copy the cache that matches this data and teacher to "
                f"{self.path}."
            ) from problem
        if not may_build:
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}. In a distributed run only prepare_data (rank "
                "0 of each node) builds the cache: call datamodule.prepare_data() before setup(), "
                "or let the Trainer do it."
            ) from problem
        self.build(datamodule, expected)
        return self.check(expected)

    def _load_teacher(self) -> nn.Module:
        from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher

        if self.teacher is not None:
            teacher = self.teacher
            return teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        return PretrainedTeacher(self.teacher_checkpoint)

    def _arrays(self, expected: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        storage = STORAGE_DTYPES[self.dtype][0].str
        classes = expected["num_classes"]
        arrays = {}
        for split in self.splits:
            rows, views = expected["data"][split]["rows"], self.views_of(split)
            if self.topk:
                k = min(self.topk, classes)
                index_dtype = "<i2" if classes <= np.iinfo(np.int16).max else "<i4"
                arrays[f"{split}/values"] = ((rows, views, k), storage)
                arrays[f"{split}/indices"] = ((rows, views, k), index_dtype)
            else:
                arrays[f"{split}/logits"] = ((rows, views, classes), storage)
        return arrays

    def _encode(self, values: torch.Tensor) -> np.ndarray:
        values = values.to(STORAGE_DTYPES[self.dtype][1]).cpu()
        if self.dtype == "bfloat16":
            return values.view(torch.int16).numpy().view(np.uint16)
        return values.numpy()

    def build(
        self,
        datamodule: TransferSetDataModule,
        expected: dict[str, Any] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        """One pass of the teacher over every cached split and view, written atomically.

        Args:
            datamodule: the transfer set (its raw splits and :meth:`transform_batch`).
            expected: :meth:`expected_identity` if already computed.
            on_batch: called after every teacher batch (tests interrupt the build with it).
        """
        expected = expected or self.expected_identity(datamodule)
        if self.views > 1 and not datamodule.augments_train:
            raise ValueError(
                f"views={self.views} but {type(datamodule).__name__} has no random training "
                "augmentation, so every view would be the same image: use views: 1"
            )
        teacher = self._load_teacher()
        device = torch.device(self.device) if self.device else _default_device()
        teacher = teacher.to(device)
        classes = expected["num_classes"]
        total = sum(expected["data"][s]["rows"] * self.views_of(s) for s in self.splits)
        with (
            AtomicCacheWriter(self.path, self._arrays(expected)) as writer,
            tqdm(
                total=total,
                desc=f"Building teacher cache {self.path.name}",
                unit="img",
                disable=not self.progress,
            ) as bar,
            torch.inference_mode(),
        ):
            for split in self.splits:
                inputs, _ = datamodule.raw_split(split)
                for view in range(self.views_of(split)):
                    for start in range(0, len(inputs), self.batch_size):
                        rows = torch.arange(start, min(start + self.batch_size, len(inputs)))
                        batch = {
                            "input": inputs[rows].to(device),
                            "index": rows.to(device),
                            "view": torch.full_like(rows, view).to(device),
                        }
                        x = datamodule.transform_batch(batch, split)["input"]
                        logits = _logits(teacher(x)).float()
                        if logits.shape[-1] != classes:
                            raise TeacherCacheError(
                                f"the teacher outputs {logits.shape[-1]} logits but the data has "
                                f"{classes} classes: use a teacher trained on this data set"
                            )
                        self._write(writer, split, rows, view, logits)
                        bar.update(len(rows))
                        if on_batch is not None:
                            on_batch()
            header = {
                **expected,
                "teacher_source": self.teacher_checkpoint
                or f"{type(self.teacher).__module__}.{type(self.teacher).__qualname__}",
                "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            }
            writer.commit(header)
        self._verified = None

    def _write(
        self, writer: AtomicCacheWriter, split: str, rows: torch.Tensor, view: int, logits
    ) -> None:
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if not self.topk:
            writer.array(f"{split}/logits")[start:stop, view] = self._encode(logits)
            return
        values, indices = topk_log_probs(logits, self.topk, self.temperature)
        writer.array(f"{split}/values")[start:stop, view] = self._encode(values)
        writer.array(f"{split}/indices")[start:stop, view] = indices.cpu().numpy()

    def outputs(self, header: dict[str, Any], split: str) -> SplitOutputs | None:
        """Reader of one split's outputs (None when the split is not cached)."""
        if split not in self.splits:
            return None
        arrays = {
            name.split("/", 1)[1]: ArraySpec(spec["offset"], tuple(spec["shape"]), spec["dtype"])
            for name, spec in header["arrays"].items()
            if name.split("/", 1)[0] == split
        }
        return SplitOutputs(self.path, arrays, self.dtype)


def _logits(output: Any) -> torch.Tensor:
    from kd_lightning.teachers import output_logits

    return output_logits(output)
