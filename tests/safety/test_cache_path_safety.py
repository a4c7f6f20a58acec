"""Kind 1, the teacher cache: rebuilding a cache replaces only an earlier teacher cache. A
``path`` that names a checkpoint, any other file, a directory, or one of the cache's own
inputs (however spelled) is refused before anything is written; the file is byte-identical."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kd_lightning.container import write_tensors
from kd_lightning.data import DigitsTransferSet, TeacherCache
from kd_lightning.data.cache_path_guard import CachePathError
from kd_lightning.models import MLP
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import PretrainedTeacher


def save_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    model = MLP(10, hidden_sizes=[8])
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "kd_lightning": {"student_spec": model_spec(model)}}, path)
    return path


def build(path: Path, teacher: Path | None = None, **kwargs) -> DigitsTransferSet:
    cache = TeacherCache(str(path), progress=False, splits=("val",), **kwargs)
    if teacher is not None:
        cache.teacher_checkpoint = str(teacher)
    data = DigitsTransferSet(batch_size=256, teacher_cache=cache)
    data.prepare_data()
    return data


def other_files(folder: Path) -> dict[str, Path]:
    """Files a mistyped cache path could name; none of them is a teacher cache."""
    files = {
        "a student checkpoint": save_teacher(folder / "student.ckpt"),
        "a config": folder / "config.yaml",
        "an empty file": folder / "empty",
        "another kd_lightning container": folder / "images.kdss",
    }
    files["a config"].write_text("model: {}\n")
    files["an empty file"].write_bytes(b"")
    write_tensors(files["another kd_lightning container"], {"x": torch.zeros(3)}, {}, "other", 1)
    return files


def test_a_rebuild_never_replaces_a_file_that_is_not_a_teacher_cache(tmp_path):
    teacher = save_teacher(tmp_path / "teacher.ckpt")
    for name, path in other_files(tmp_path).items():
        before = path.read_bytes()
        with pytest.raises(CachePathError) as error:
            build(path, teacher)
        assert path.read_bytes() == before, name
        text = str(error.value)
        assert repr(str(path)) in text and "not a teacher cache" in text and "path" in text, name
    assert teacher.read_bytes() == (tmp_path / "teacher.ckpt").read_bytes()


def test_the_cache_path_never_names_its_own_teacher_however_spelled(tmp_path, monkeypatch):
    teacher = save_teacher(tmp_path / "teacher.ckpt")
    before = teacher.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(teacher, tmp_path / "link.ckpt")
    monkeypatch.chdir(tmp_path)
    spellings = [
        str(teacher),
        "teacher.ckpt",
        str(tmp_path / "sub" / ".." / "teacher.ckpt"),
        str(tmp_path / "link.ckpt"),
    ]
    for spelling in spellings:
        with pytest.raises(CachePathError, match="would write over the file it reads"):
            TeacherCache(spelling, teacher_checkpoint=str(teacher), progress=False)
    with pytest.raises(CachePathError, match="the teacher's checkpoint_path"):
        TeacherCache("link.ckpt", teacher=PretrainedTeacher(str(teacher)), progress=False)
    assert teacher.read_bytes() == before


def test_a_directory_is_refused_and_left_as_it_was(tmp_path):
    teacher = save_teacher(tmp_path / "teacher.ckpt")
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(CachePathError, match="is a directory"):
        build(folder, teacher)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_a_stale_teacher_cache_is_still_rebuilt(tmp_path):
    teacher = save_teacher(tmp_path / "teacher.ckpt")
    path = tmp_path / "digits.kdtc"
    build(path, teacher, dtype="float16")
    first = path.read_bytes()
    build(path, teacher, dtype="float32")  # another storage dtype: stale, rebuilt in place
    assert path.read_bytes() != first
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0xFF  # the trailer: the header can no longer be read, the magic is ours
    path.write_bytes(bytes(damaged))
    build(path, teacher, dtype="float32")
    assert TeacherCache(str(path), progress=False).open()["dtype"] == "float32"
