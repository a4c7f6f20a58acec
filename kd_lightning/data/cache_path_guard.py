"""What a teacher cache may write over: only an earlier teacher cache, never one of its inputs.

:class:`~kd_lightning.data.TeacherCache` rebuilds a stale or damaged file in place. Its
``path`` is whatever the user typed, so without a check a typo (``path: runs/student.ckpt``)
or a copy-paste (``path`` equal to ``teacher_checkpoint``) replaces a checkpoint, the teacher
itself included. Two rules, checked when the cache is configured and again just before a
build writes:

- ``path`` never names (after resolving links and ``..``) a file the cache reads: the teacher
  checkpoint, or the file a given teacher was loaded from;
- an existing file at ``path`` is replaced only if it is a teacher cache: the container's
  magic and, when its header is readable, the teacher-cache format (a damaged teacher cache,
  an interrupted one of an older format, is still one). Anything else is refused, naming the
  file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kd_lightning.container import MAGIC, ContainerError
from kd_lightning.container import read_header as read_container_header
from kd_lightning.data.cache_format import FORMAT, TeacherCacheError

OLD_CACHE_MAGICS = (b"KDTCACHE",)
"""Magics of teacher caches of earlier formats (replaced by a rebuild, like a damaged one)."""


class CachePathError(TeacherCacheError, ValueError):
    """A teacher cache's ``path`` names a file the cache must not write over."""


def _inputs(teacher_checkpoint: str | os.PathLike | None, teacher: Any) -> list[tuple[str, Any]]:
    named = [("teacher_checkpoint", teacher_checkpoint)]
    named.append(("the teacher's checkpoint_path", getattr(teacher, "checkpoint_path", None)))
    return [(what, value) for what, value in named if value is not None]


def refuse_aliased_inputs(
    path: str | os.PathLike, teacher_checkpoint: str | os.PathLike | None, teacher: Any = None
) -> None:
    """Raise :class:`CachePathError` if ``path`` is the same file as one of the cache's inputs."""
    target = Path(path).resolve()
    for what, value in _inputs(teacher_checkpoint, teacher):
        source = Path(value).resolve()
        if source == target or (target.exists() and source.exists() and target.samefile(source)):
            raise CachePathError(
                f"the teacher cache's path {str(path)!r} is {what} {str(value)!r}: building the "
                "cache would write over the file it reads. Give the cache its own file, e.g. "
                f"path: {str(Path(value).with_suffix('.kdtc'))!r}."
            )


def is_teacher_cache(path: str | os.PathLike) -> bool:
    """Whether the existing file at ``path`` is a teacher cache (possibly stale or damaged)."""
    with open(path, "rb") as handle:
        magic = handle.read(len(MAGIC))
    if magic in OLD_CACHE_MAGICS:
        return True
    if magic != MAGIC:
        return False
    try:
        header = read_container_header(path)
    except ContainerError:  # the magic is ours, the rest damaged: a cache whose write broke
        return True
    return header.get("format") == FORMAT


def refuse_replacing_other_files(path: str | os.PathLike) -> None:
    """Raise :class:`CachePathError` if a file that is not a teacher cache sits at ``path``."""
    target = Path(path)
    if target.is_dir():
        raise CachePathError(
            f"the teacher cache's path {str(path)!r} is a directory: name a file inside it, "
            f"e.g. {str(target / 'teacher.kdtc')!r}."
        )
    if target.exists() and not is_teacher_cache(target):
        raise CachePathError(
            f"the teacher cache's path {str(path)!r} holds a file that is not a teacher cache "
            "(a checkpoint, data, another kd_lightning file): rebuilding the cache would "
            "replace it, so nothing was written. Point the cache's `path` at its own file "
            "(e.g. a new name ending in .kdtc), or move that file away if it is not needed."
        )
