"""The shared container and the one digest: exact round trips, damage detected, one teacher identity."""

from __future__ import annotations

import hashlib
import zlib

import pytest
import torch
from torch import nn

from kd_lightning.container import (
    PREAMBLE_SIZE,
    TRAILER,
    ContainerError,
    read_header,
    read_tensors,
    write_tensors,
)
from kd_lightning.digest import file_digest, module_digest, tensor_digest
from kd_lightning.teachers import FrozenTeacher

FMT, VERSION = "test.format", 3


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=generator),
        "bf16": torch.randn(4, 7, generator=generator).bfloat16(),
        "f16": torch.randn(2, 2, generator=generator).half(),
        "long": torch.arange(-3, 6),
        "u8": torch.randint(0, 255, (3, 2, 2), generator=generator, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def test_round_trip_keeps_dtype_shape_and_bits(tmp_path):
    tensors = _tensors()
    path = write_tensors(tmp_path / "a.kd", tensors, {"note": [1, "x"]}, FMT, VERSION)
    header, loaded = read_tensors(path, FMT, VERSION)
    assert header["note"] == [1, "x"] and header["format"] == FMT
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["a.kd"]  # no temporary left


def test_layout_is_the_documented_one(tmp_path):
    """Preamble magic, 64-byte aligned arrays, header CRC in the trailer: checked by hand."""
    path = write_tensors(tmp_path / "a.kd", {"x": torch.arange(10, dtype=torch.int16)}, {}, FMT, 1)
    data = path.read_bytes()
    assert data[:8] == b"KDLARRAY" and int.from_bytes(data[8:12], "little") == 1
    assert (
        data[PREAMBLE_SIZE : PREAMBLE_SIZE + 20]
        == torch.arange(10, dtype=torch.int16).numpy().tobytes()
    )
    length, crc, end = TRAILER.unpack(data[-TRAILER.size :])
    assert end == b"KDL__END"
    assert zlib.crc32(data[-TRAILER.size - length : -TRAILER.size]) == crc


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_flipped_byte_is_detected(tmp_path, where):
    path = write_tensors(tmp_path / "a.kd", _tensors(), {}, FMT, VERSION)
    header = read_header(path)
    offset = header["payload"]["start"] + 3 if where == "payload" else header["payload"]["end"] + 5
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="corrupt"):
        read_tensors(path, FMT, VERSION)


@pytest.mark.parametrize("keep", [0, 10, PREAMBLE_SIZE + 5, -1])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path = write_tensors(tmp_path / "a.kd", _tensors(), {}, FMT, VERSION)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ContainerError, match="truncated|not completely written|corrupt"):
        read_tensors(path, FMT, VERSION)


def test_other_formats_versions_and_files_are_named(tmp_path):
    path = write_tensors(tmp_path / "a.kd", {"x": torch.ones(2)}, {}, FMT, VERSION)
    with pytest.raises(ContainerError, match="is a 'test.format', not a 'other'"):
        read_header(path, "other")
    with pytest.raises(ContainerError, match="format version 3, this library reads version 4"):
        read_header(path, FMT, 4)
    torch.save({"x": 1}, tmp_path / "pickle.pt")
    with pytest.raises(ContainerError, match="bad magic"):
        read_header(tmp_path / "pickle.pt")
    with pytest.raises(ContainerError, match="does not exist"):
        read_header(tmp_path / "absent.kd")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write_tensors(tmp_path / "a.kd", {"x": torch.ones(2)}, {}, FMT, VERSION)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # the header is not JSON: the write fails before the rename
        write_tensors(path, {"x": torch.zeros(3)}, {"bad": object()}, FMT, VERSION)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.kd"]


# ------------------------------------------------------------------------------------ digests


def test_file_and_tensor_digests_are_sha256_of_what_they_say(tmp_path):
    (tmp_path / "f").write_bytes(b"kd" * 1000)
    assert file_digest(tmp_path / "f") == "sha256:" + hashlib.sha256(b"kd" * 1000).hexdigest()
    x = torch.tensor([1.0, 2.0])
    expected = hashlib.sha256(b"torch.float32(2,)" + x.numpy().tobytes()).hexdigest()
    assert tensor_digest(x) == "sha256:" + expected
    assert tensor_digest(x) != tensor_digest(x.double())  # the dtype is part of the identity


def test_one_teacher_one_digest_whatever_wraps_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    digest = module_digest(model)
    state = model.state_dict()
    by_hand = hashlib.sha256()
    for name, value in state.items():
        by_hand.update(name.encode())
        value = value.contiguous()
        by_hand.update(f"{value.dtype}{tuple(value.shape)}".encode())
        by_hand.update(value.flatten().view(torch.uint8).numpy().tobytes())
    assert digest == "sha256:" + by_hand.hexdigest()
    assert module_digest(FrozenTeacher(model)) == digest
    assert module_digest(nn.DataParallel(model)) == digest
    rebuilt = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    rebuilt.load_state_dict(state)
    assert module_digest(rebuilt) == digest  # same weights loaded elsewhere: same teacher
    with torch.no_grad():
        model[1].running_mean += 1  # a buffer counts, not only parameters
    assert module_digest(model) != digest
