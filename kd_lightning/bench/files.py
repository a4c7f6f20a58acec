"""Atomic file writes for study outputs: a reader (or a killed job) never sees half a file.

Every result a study writes (``result.json``, ``final.ckpt``, ``results.md``/``.csv``/``.png``,
``learning_curves.png``) goes to a temporary file in the same folder first and is then moved
over the target with :func:`os.replace`, which is atomic on POSIX and Windows file systems.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, else delete it.

    The temporary file keeps ``path``'s suffix, so writers that choose a format from the suffix
    (matplotlib's ``savefig``) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{path.stem}-", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)
