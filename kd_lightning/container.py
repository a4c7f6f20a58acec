"""One file format for everything the library stores for later: teacher caches and synthesised
transfer sets.

The digests of what a file was made from are in :mod:`kd_lightning.digest`.

**Container.** Named arrays and a JSON header in one file that cannot carry code (no pickle):
memory-mappable, checked on load, written atomically::

    preamble   64 bytes: magic b"KDLARRAY", container version (uint32 LE), zeros
    payload    the arrays, each 64-byte aligned, C order
    header     JSON: ``format`` (what the file is), ``arrays`` (offset, shape, dtype of each),
               ``payload`` (CRC-32 of every 4 MiB chunk), and the writer's own fields
    trailer    20 bytes: header length (uint64 LE), CRC-32 of the header (uint32 LE), b"KDL__END"

:func:`read_header` checks the preamble, trailer, header CRC and sizes (a truncated or
half-written file is refused); :func:`verify_payload` checks every payload chunk. Writes go to a
temporary file in the same folder, are fsynced and renamed over the final path (``os.replace``):
a writer killed mid-write leaves at most a temporary file, never a file at ``path``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONTAINER_VERSION = 1
MAGIC = b"KDLARRAY"
END_MAGIC = b"KDL__END"
PREAMBLE_SIZE = 64
TRAILER = struct.Struct("<QI8s")
ALIGNMENT = 64
CHUNK_SIZE = 1 << 22
"""Bytes per CRC-32 chunk of the payload (4 MiB)."""

#: Magic numbers of files this library wrote before the shared container existed.
_OLD_MAGICS = {b"KDTCACHE": "a teacher cache of an older format"}

#: torch dtype -> numpy dtype on disk. bfloat16 has no numpy dtype: stored as its raw 16 bits.
TORCH_TO_NUMPY: dict[torch.dtype, str] = {
    torch.float64: "<f8",
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.bfloat16: "<u2",
    torch.int64: "<i8",
    torch.int32: "<i4",
    torch.int16: "<i2",
    torch.int8: "|i1",
    torch.uint8: "|u1",
    torch.bool: "|b1",
}
_TORCH_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in TORCH_TO_NUMPY}


class ContainerError(ValueError):
    """A container file that cannot be used: missing, truncated, corrupt, or of another kind.

    Attributes:
        path: the file.
        reasons: one line per problem found.
    """

    def __init__(self, path: str | os.PathLike, reasons: list[str]) -> None:
        self.path, self.reasons = Path(path), list(reasons)
        super().__init__(f"{path}: " + "; ".join(self.reasons))


# ------------------------------------------------------------------------------ the layout


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name such as ``"float32"`` (as recorded in a container header)."""
    if name not in _TORCH_BY_NAME:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_TORCH_BY_NAME)}")
    return _TORCH_BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``; refuses dtypes the container cannot store."""
    if dtype not in TORCH_TO_NUMPY:
        raise ValueError(f"a container cannot store {dtype}; valid: {sorted(_TORCH_BY_NAME)}")
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Where one payload array lives: byte offset in the file, shape, on-disk (numpy) dtype.

    ``torch_dtype`` names the tensor dtype the bytes are (``bfloat16`` stored as ``<u2``).
    """

    offset: int
    shape: tuple[int, ...]
    dtype: str
    torch_dtype: str | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @classmethod
    def from_header(cls, entry: dict[str, Any]) -> ArraySpec:
        return cls(
            int(entry["offset"]), tuple(entry["shape"]), entry["dtype"], entry.get("torch_dtype")
        )


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _preamble() -> bytes:
    return (MAGIC + struct.pack("<I", CONTAINER_VERSION)).ljust(PREAMBLE_SIZE, b"\0")


def plan_layout(
    arrays: dict[str, tuple[tuple[int, ...], str | torch.dtype]],
) -> tuple[dict[str, ArraySpec], int]:
    """Aligned offsets for named arrays ``{name: (shape, numpy dtype str or torch dtype)}``.

    Returns:
        ``(specs, payload end)``.
    """
    specs: dict[str, ArraySpec] = {}
    offset = PREAMBLE_SIZE
    for name, (shape, dtype) in arrays.items():
        offset = _align(offset)
        if isinstance(dtype, torch.dtype):
            storage, tag = TORCH_TO_NUMPY[dtype], dtype_name(dtype)
        else:
            storage, tag = np.dtype(dtype).str, None
        specs[name] = ArraySpec(offset, tuple(int(s) for s in shape), np.dtype(storage).str, tag)
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


# ------------------------------------------------------------------------------ writing


def _host() -> str:
    return socket.gethostname().replace(".", "-")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of writers on this host that no longer run (killed mid-write)."""
    host = _host()
    for candidate in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        try:
            pid = int(candidate.name[len(f".{path.name}.{host}.") :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


class ContainerWriter:
    """Writes a container through a temporary file; only :meth:`commit` makes it appear at ``path``.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, a
    ``KeyboardInterrupt``) deletes the temporary file. A process killed with SIGKILL leaves the
    temporary file behind (never at ``path``); the next writer on the same host removes it.

    Args:
        path: final location of the file (its folder is created).
        arrays: ``{name: (shape, dtype)}`` of the payload; a torch dtype is recorded with the
            array so :func:`read_tensors` returns tensors of that dtype.
        format: what the file is (``"kd_lightning.teacher_cache"``), checked by readers.
        format_version: version of that format.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        arrays: dict[str, tuple[tuple[int, ...], str | torch.dtype]],
        format: str,
        format_version: int,
    ) -> None:
        self.path = Path(path)
        self.format, self.format_version = format, format_version
        self.specs, self.payload_end = plan_layout(arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.temporary = _temporary_path(self.path)
        self._maps: dict[str, np.memmap] = {}
        self._committed = False

    def __enter__(self) -> ContainerWriter:
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
        """The writable memory map of one payload array (on-disk dtype)."""
        return self._maps[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole array from a tensor of the dtype it was declared with."""
        if name in self._maps:
            self._maps[name][...] = to_numpy(tensor)

    def commit(self, header: dict[str, Any]) -> None:
        """Checksum the payload, append header and trailer, fsync, and rename into place."""
        for array in self._maps.values():
            array.flush()
        self._maps.clear()
        with open(self.temporary, "r+b") as handle:
            crcs = _chunk_crcs(handle, PREAMBLE_SIZE, self.payload_end)
            header = {
                **header,
                "format": self.format,
                "format_version": self.format_version,
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


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as the numpy array the container stores (bfloat16 as raw bits)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def write_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    header: dict[str, Any],
    format: str,
    format_version: int,
) -> Path:
    """Write named tensors and a JSON header as one container, atomically; returns the path."""
    arrays = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with ContainerWriter(path, arrays, format, format_version) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.commit(header)
    return Path(path)


# ------------------------------------------------------------------------------ reading


def is_container(path: str | os.PathLike) -> bool:
    """Whether the file starts with the container's magic (nothing else is checked)."""
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def read_header(
    path: str | os.PathLike, format: str | None = None, format_version: int | None = None
) -> dict[str, Any]:
    """Read and check the structure of a container file (not the payload checksums).

    Args:
        path: the file.
        format: when given, the file must be of this format.
        format_version: when given, the file must have this format version.

    Raises:
        ContainerError: missing, truncated, not a container, wrong version, corrupt header, or
            another format.
    """
    path = Path(path)
    if not path.is_file():
        raise ContainerError(path, ["the file does not exist"])
    size = path.stat().st_size
    if size < PREAMBLE_SIZE + TRAILER.size:
        raise ContainerError(path, [f"the file is truncated ({size} bytes)"])
    with open(path, "rb") as handle:
        preamble = handle.read(PREAMBLE_SIZE)
        handle.seek(size - TRAILER.size)
        header_length, header_crc, end_magic = TRAILER.unpack(handle.read(TRAILER.size))
        magic = preamble[: len(MAGIC)]
        if magic in _OLD_MAGICS:
            raise ContainerError(path, [f"{_OLD_MAGICS[magic]}, which this version cannot read"])
        if magic != MAGIC:
            raise ContainerError(path, ["not a kd_lightning container file (bad magic)"])
        if preamble != _preamble():
            version = struct.unpack("<I", preamble[len(MAGIC) : len(MAGIC) + 4])[0]
            detail = f"container version {version}, this library reads {CONTAINER_VERSION}"
            raise ContainerError(path, [f"the preamble is corrupt or of another {detail}"])
        if end_magic != END_MAGIC:
            raise ContainerError(
                path, ["the file is truncated or was not completely written (no end marker)"]
            )
        header_start = size - TRAILER.size - header_length
        if header_start < PREAMBLE_SIZE:
            raise ContainerError(path, ["the trailer is corrupt (impossible header length)"])
        handle.seek(header_start)
        encoded = handle.read(header_length)
    if zlib.crc32(encoded) != header_crc:
        raise ContainerError(path, ["the header is corrupt (CRC-32 mismatch)"])
    header = json.loads(encoded)
    if header["payload"]["end"] != header_start:
        raise ContainerError(
            path, ["the file is truncated or has extra bytes (payload size mismatch)"]
        )
    if format is not None and header.get("format") != format:
        raise ContainerError(path, [f"the file is a {header.get('format')!r}, not a {format!r}"])
    if format_version is not None and header.get("format_version") != format_version:
        raise ContainerError(
            path,
            [
                f"the file has {format} format version {header.get('format_version')}, this "
                f"library reads version {format_version}"
            ],
        )
    return header


def verify_payload(path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Check every payload chunk against the CRC-32 recorded in the header.

    Raises:
        ContainerError: naming the first corrupt chunk's byte range.
    """
    path = Path(path)
    payload = header["payload"]
    if payload.get("chunk_size") != CHUNK_SIZE:
        raise ContainerError(path, ["the header records an unknown chunk size"])
    with open(path, "rb") as handle:
        crcs = _chunk_crcs(handle, payload["start"], payload["end"])
    if len(crcs) != len(payload["crc32"]):
        raise ContainerError(path, ["the payload is truncated"])
    for i, (actual, expected) in enumerate(zip(crcs, payload["crc32"], strict=True)):
        if actual != expected:
            start = payload["start"] + i * CHUNK_SIZE
            raise ContainerError(
                path,
                [f"the payload is corrupt: CRC-32 mismatch in bytes {start}..{start + CHUNK_SIZE}"],
            )


def array_specs(header: dict[str, Any]) -> dict[str, ArraySpec]:
    """The layout of every payload array, from a header."""
    return {name: ArraySpec.from_header(entry) for name, entry in header["arrays"].items()}


def as_tensor(raw: np.ndarray, spec: ArraySpec) -> torch.Tensor:
    """A tensor holding a copy of stored values, in the torch dtype they were written from."""
    values = torch.from_numpy(np.array(raw, copy=True))
    if spec.torch_dtype == "bfloat16":
        values = values.view(torch.int16).view(torch.bfloat16)
    return values


def read_tensors(
    path: str | os.PathLike, format: str, format_version: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a whole container: checks structure and every payload chunk, returns (header, tensors).

    Raises:
        ContainerError: see :func:`read_header` and :func:`verify_payload`.
    """
    header = read_header(path, format, format_version)
    verify_payload(path, header)
    tensors = {}
    for name, spec in array_specs(header).items():
        if spec.nbytes:
            raw = np.memmap(path, dtype=spec.dtype, mode="r", offset=spec.offset, shape=spec.shape)
        else:
            raw = np.empty(spec.shape, dtype=spec.dtype)
        tensors[name] = as_tensor(raw, spec)
    return header, tensors
