"""CIFAR archive pipeline on small archives built here in the official format (no network)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data.cifar_archive import (
    CIFAR10,
    CIFAR100,
    ChecksumMismatchError,
    CifarArchive,
    CifarArchiveError,
    download_url,
    load_cifar,
    md5sum,
    prepare_cifar,
    read_batch,
    safe_extract,
)

PER_BATCH = 3


def write_batch(path: Path, label_key: str, rng: np.random.Generator, extra: dict | None = None):
    data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=PER_BATCH).tolist()
    batch = {
        b"batch_label": b"training batch",
        b"data": data,
        label_key.encode(): labels,
        b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)],
        **(extra or {}),
    }
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)  # the archives are Python 2 era pickles
    return data, labels


def make_archive(tmp_path: Path, base: CifarArchive, seed: int = 0):
    """A tar.gz laid out like ``base`` with tiny batches; returns (spec, expected content)."""
    rng = np.random.default_rng(seed)
    source = tmp_path / "source" / base.folder
    source.mkdir(parents=True)
    expected = {}
    for name in (*base.train_files, *base.test_files):
        extra = {b"coarse_labels": [99] * PER_BATCH} if base is CIFAR100 else None
        expected[name] = write_batch(source / name, base.label_key, rng, extra)
    names = [f"class_{i}".encode() for i in range(10)]
    with open(source / base.meta_file, "wb") as handle:
        pickle.dump({base.names_key.encode(): names}, handle, protocol=2)
    archive_path = tmp_path / "source" / base.filename
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(source, arcname=base.folder)
    spec = dataclasses.replace(base, url=archive_path.as_uri(), md5=md5sum(archive_path))
    return spec, expected


@pytest.mark.parametrize("base", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_download_verify_extract_read(tmp_path: Path, base: CifarArchive) -> None:
    spec, expected = make_archive(tmp_path, base)
    root = tmp_path / "data"
    train = load_cifar(root, spec, "train", download=True, progress=False)
    test = load_cifar(root, spec, "test", download=False)

    assert (root / base.filename).is_file() and (root / base.folder).is_dir()
    assert not list(root.glob("*.part")) and not list(root.glob(".extract-*"))
    want_train = [expected[name] for name in base.train_files]
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.long
    assert train.images.shape == (PER_BATCH * len(base.train_files), 3, 32, 32)
    assert train.labels.tolist() == [label for _, labels in want_train for label in labels]
    data = np.concatenate([d for d, _ in want_train])
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major 32x32.
    assert train.images[1, 1, 0].tolist() == data[1, 1024:1056].tolist()
    assert train.images[2, 2, 31, 31].item() == data[2, 3071]
    test_data, test_labels = expected[base.test_files[0]]
    assert torch.equal(test.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == test_labels  # fine labels for CIFAR-100, not coarse (99)
    assert train.classes == [f"class_{i}" for i in range(10)]


def test_extracted_folder_is_reused_without_the_archive(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    root = tmp_path / "data"
    first = load_cifar(root, spec, "test", download=True, progress=False)
    (root / spec.filename).unlink()
    again = load_cifar(root, spec, "test", download=False)
    assert torch.equal(first.images, again.images)


def test_local_archive_is_used_without_download(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    root = tmp_path / "data"
    root.mkdir()
    (root / spec.filename).write_bytes((tmp_path / "source" / spec.filename).read_bytes())
    offline = dataclasses.replace(spec, url="file:///nonexistent/never-fetched.tar.gz")
    assert prepare_cifar(root, offline, download=False) == root / spec.folder


def test_missing_data_without_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare_cifar(tmp_path, "cifar100", download=False)
    message = str(excinfo.value)
    assert "download=True" in message and CIFAR100.url in message
    assert str(tmp_path / CIFAR100.filename) in message


def test_local_archive_checksum_mismatch_names_both_sums_and_the_fix(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    root = tmp_path / "data"
    root.mkdir()
    archive = root / spec.filename
    archive.write_bytes((tmp_path / "source" / spec.filename).read_bytes())
    wrong = dataclasses.replace(spec, md5="0" * 32)
    with pytest.raises(ChecksumMismatchError) as excinfo:
        prepare_cifar(root, wrong)
    message = str(excinfo.value)
    assert "0" * 32 in message and md5sum(archive) in message
    assert "download=True" in message
    assert not (root / spec.folder).exists()


def test_downloaded_checksum_mismatch_leaves_nothing_behind(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    destination = tmp_path / "data" / spec.filename
    with pytest.raises(ChecksumMismatchError, match="expected f+, got [0-9a-f]{32}"):
        download_url(spec.url, destination, md5="f" * 32, progress=False)
    assert list(destination.parent.iterdir()) == []


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CifarArchiveError, match="could not download .* by hand"):
        download_url((tmp_path / "absent.tar.gz").as_uri(), tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz.part").exists()


def test_truncated_archive_is_reported_as_corrupt(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    root = tmp_path / "data"
    root.mkdir()
    content = (tmp_path / "source" / spec.filename).read_bytes()
    (root / spec.filename).write_bytes(content[: len(content) // 2])
    truncated = dataclasses.replace(spec, md5=md5sum(root / spec.filename))
    with pytest.raises(CifarArchiveError, match="corrupt or incomplete"):
        prepare_cifar(root, truncated)
    assert not (root / spec.folder).exists() and not list(root.glob(".extract-*"))


def test_archive_without_the_expected_files_is_rejected(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    # A genuine CIFAR-10 archive presented as CIFAR-100: wrong folder and file names.
    as_cifar100 = dataclasses.replace(CIFAR100, url=spec.url, md5=spec.md5, filename=spec.filename)
    with pytest.raises(CifarArchiveError, match="not the official cifar100 archive"):
        prepare_cifar(tmp_path / "data", as_cifar100, download=True, progress=False)


def test_corrupt_batch_file_names_the_file(tmp_path: Path) -> None:
    spec, _ = make_archive(tmp_path, CIFAR10)
    root = tmp_path / "data"
    folder = prepare_cifar(root, spec, download=True, progress=False)
    (folder / "data_batch_3").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(CifarArchiveError, match="data_batch_3 is not a readable CIFAR pickle"):
        load_cifar(root, spec, "train")


def test_batch_with_wrong_shape_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(CifarArchiveError, match=r"shape \(N, 3072\)"):
        read_batch(path, "labels")


class _Exploit:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickles_cannot_run_code(tmp_path: Path, capsys) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(CifarArchiveError, match="print is not allowed"):
        read_batch(path, "labels")
    assert "executed" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../escaped.txt", "/tmp/absolute-escape.txt"])
def test_extraction_refuses_paths_outside_the_destination(tmp_path: Path, name: str) -> None:
    archive_path = tmp_path / "evil.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(CifarArchiveError, match="outside"):
        safe_extract(archive_path, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_extraction_refuses_links(tmp_path: Path) -> None:
    archive_path = tmp_path / "link.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(CifarArchiveError, match="links"):
        safe_extract(archive_path, tmp_path / "out")


def test_unknown_dataset_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar(tmp_path, "cifar1000")
