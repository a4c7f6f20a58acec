"""IDX files (the MNIST family's format), read and checked without torchvision.

The format (LeCun et al., the MNIST database's page): a 4-byte magic number ``0x00 0x00 <type>
<ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the values in C order. The
MNIST and Fashion-MNIST files hold ``uint8`` values (type ``0x08``): images ``(N, 28, 28)`` and
labels ``(N,)``. Files may be gzip-compressed (``.gz``).

Integrity is checked on the *decompressed* bytes (MD5): Debian repackages Fashion-MNIST with
different gzip headers, so the ``.gz`` files' checksums differ from the publisher's while the
data does not. A truncated or corrupted file is refused with :class:`IDXFileError`, whose
message names the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

#: IDX type byte -> numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFileError(ValueError):
    """An IDX file that is truncated, corrupted, or not the file expected (the message says which)."""


def read_bytes(path: str | Path) -> bytes:
    """The decompressed content of ``path`` (gunzipped when it ends in ``.gz``).

    Raises:
        IDXFileError: the gzip stream is truncated or corrupt.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        # EOFError: the stream ends early; BadGzipFile (an OSError) and zlib.error: bad bytes
        # or a CRC/length mismatch in the gzip trailer.
        raise IDXFileError(
            f"{path} is not a complete gzip file ({error}); the download or install was "
            "truncated or corrupted: reinstall the data set or delete the file"
        ) from error


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """The array stored in IDX bytes ``data`` (a read-only view; shape from the header).

    Raises:
        IDXFileError: bad magic number, unknown type, or a size that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXFileError(
            f"{source} does not start with an IDX magic number (0x00 0x00 <type> <ndim>); got "
            f"{data[:4].hex() or 'an empty file'}"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise IDXFileError(
            f"{source} has IDX type byte 0x{type_code:02x}; known: "
            + ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFileError(f"{source} is truncated inside its header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise IDXFileError(
            f"{source} is {state}: its header declares shape {tuple(shape)} ({expected} bytes) "
            f"but it holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | Path, md5: str | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain), checking the MD5 of its decompressed bytes if given.

    Args:
        path: the file.
        md5: expected hex MD5 of the decompressed content; ``None`` skips the check.

    Raises:
        IDXFileError: truncated or corrupt file, or a checksum mismatch.
    """
    data = read_bytes(path)
    if md5 is not None:
        actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if actual != md5:
            raise IDXFileError(
                f"{path}: the MD5 of its decompressed content is {actual}, expected {md5}; the "
                "file is corrupted or is not the expected data set: reinstall it"
            )
    return parse_idx(data, source=str(path))
