"""Saved synthesised sets: exact round trip, atomic writes, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kd_lightning.container as container
from kd_lightning.container import write_tensors
from kd_lightning.digest import tensor_digest
from kd_lightning.synthesis import SynthesisedSet, SynthesisedSetError, module_digest
from kd_lightning.synthesis.store import FORMAT, LEGACY_VERSION, VERSION
from kd_lightning.teachers import FrozenTeacher


def _set(n: int = 10) -> SynthesisedSet:
    generator = torch.Generator().manual_seed(0)
    return SynthesisedSet(
        inputs=torch.rand(n, 1, 8, 8, generator=generator),
        teacher_logits=torch.randn(n, 10, generator=generator),
        classes=torch.arange(n) % 10,
        metadata={
            "method": "deep_inversion",
            "settings": {"steps": 3},
            "teacher_digest": "sha256:ab",
        },
    )


def test_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path):
    original = _set()
    path = original.save(tmp_path / "sub" / "set.pt")
    loaded = SynthesisedSet.load(path)
    assert torch.equal(loaded.inputs, original.inputs)
    assert torch.equal(loaded.teacher_logits, original.teacher_logits)
    assert torch.equal(loaded.classes, original.classes)
    assert loaded.metadata == original.metadata
    assert torch.equal(loaded.teacher_labels, original.teacher_logits.argmax(1))
    assert sorted(p.name for p in path.parent.iterdir()) == ["set.pt"]


def _crash_on_fsync(monkeypatch, message: str) -> None:
    """The disk fails while the set is written (after part of it reached the temporary file)."""

    def crash(fd):
        raise OSError(message)

    monkeypatch.setattr(container.os, "fsync", crash)


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path, monkeypatch):
    path = tmp_path / "set.pt"
    _crash_on_fsync(monkeypatch, "disk full")
    with pytest.raises(OSError, match="disk full"):
        _set().save(path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_previous_set(tmp_path, monkeypatch):
    path = _set(4).save(tmp_path / "set.pt")
    _crash_on_fsync(monkeypatch, "killed")
    with pytest.raises(OSError):
        _set(6).save(path)
    monkeypatch.undo()
    assert len(SynthesisedSet.load(path)) == 4


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthesise it first"):
        SynthesisedSet.load(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = _set().save(tmp_path / "set.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SynthesisedSetError, match="unreadable"):
        SynthesisedSet.load(path)


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_one_flipped_byte_is_detected(tmp_path, where):
    path = _set(64).save(tmp_path / "set.pt")
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SynthesisedSetError, match="corrupt|unreadable|not a synthesised"):
        SynthesisedSet.load(path)


def test_altered_tensors_fail_the_digest(tmp_path):
    original = _set()
    tensors = {
        "inputs": original.inputs + 1e-3,  # altered after the digest was taken
        "teacher_logits": original.teacher_logits,
        "classes": original.classes,
    }
    header = {"digest": original.digest(), "metadata": {}}
    write_tensors(tmp_path / "set.pt", tensors, header, FORMAT, VERSION)
    with pytest.raises(SynthesisedSetError, match="do not match the digest"):
        SynthesisedSet.load(tmp_path / "set.pt")


def test_sets_saved_by_version_1_still_load_and_are_checked(tmp_path):
    original = _set()
    payload = {
        "format": FORMAT,
        "version": LEGACY_VERSION,
        "inputs": original.inputs,
        "teacher_logits": original.teacher_logits,
        "classes": original.classes,
        "digest": tensor_digest(original.inputs, original.teacher_logits, original.classes),
        "metadata": original.metadata,
    }
    torch.save(payload, tmp_path / "old.pt")
    loaded = SynthesisedSet.load(tmp_path / "old.pt")
    assert torch.equal(loaded.inputs, original.inputs) and loaded.metadata == original.metadata
    torch.save({**payload, "inputs": original.inputs + 1e-3}, tmp_path / "altered.pt")
    with pytest.raises(SynthesisedSetError, match="do not match the digest"):
        SynthesisedSet.load(tmp_path / "altered.pt")


def test_other_files_are_refused_with_the_reason(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "model.ckpt")
    with pytest.raises(SynthesisedSetError, match="not a synthesised set"):
        SynthesisedSet.load(tmp_path / "model.ckpt")
    torch.save({"format": FORMAT, "version": VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(SynthesisedSetError, match="format version"):
        SynthesisedSet.load(tmp_path / "future.pt")
    original = _set()
    tensors = {"inputs": original.inputs, "teacher_logits": original.teacher_logits}
    write_tensors(tmp_path / "future.kd", {**tensors, "classes": original.classes}, {}, FORMAT, 9)
    with pytest.raises(SynthesisedSetError, match="format version 9"):
        SynthesisedSet.load(tmp_path / "future.kd")
    write_tensors(tmp_path / "cache.kd", tensors, {}, "kd_lightning.teacher_cache", 2)
    with pytest.raises(SynthesisedSetError, match="not a synthesised set"):
        SynthesisedSet.load(tmp_path / "cache.kd")


def test_metadata_must_be_plain_data(tmp_path):
    bad = _set()
    bad.metadata["objective"] = torch.tensor([1.0])
    with pytest.raises(SynthesisedSetError, match="plain data"):
        bad.save(tmp_path / "set.pt")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_shapes_are_refused():
    with pytest.raises(SynthesisedSetError, match="teacher_logits"):
        SynthesisedSet(torch.rand(3, 4), torch.rand(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SynthesisedSetError, match="classes"):
        SynthesisedSet(torch.rand(3, 4), torch.rand(3, 5), torch.zeros(2, dtype=torch.long))


def test_module_digest_sees_through_frozen_teacher_and_tracks_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    digest = module_digest(model)
    assert module_digest(FrozenTeacher(model)) == digest
    with torch.no_grad():
        model[1].running_mean += 1  # a buffer counts, not only parameters
    assert module_digest(model) != digest
