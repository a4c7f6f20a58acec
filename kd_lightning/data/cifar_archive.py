"""CIFAR-10 / CIFAR-100 from the official python archives, without torchvision.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009;
https://www.cs.toronto.edu/~kriz/cifar.html. Each archive is a ``.tar.gz`` holding pickled
dicts: ``data`` is a ``uint8`` array of shape (N, 3072) (the 1024 red, then green, then blue
values of a 32x32 image, row-major), ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels``
(CIFAR-100) are lists of ints. CIFAR-10 splits the training set into ``data_batch_1`` ..
``data_batch_5`` plus ``test_batch``; CIFAR-100 has ``train`` and ``test``.

The pipeline is download (``urllib``, with a progress bar) -> MD5 check -> safe extraction ->
reading, each step with an error that says what went wrong and how to fix it. Pickles are read
with an unpickler that only admits the numpy types the archives contain.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm


class CifarArchiveError(RuntimeError):
    """A CIFAR archive or extracted file that cannot be used; the message says how to fix it."""


class ChecksumMismatchError(CifarArchiveError):
    """A file's MD5 differs from the published checksum."""


@dataclasses.dataclass(frozen=True)
class CifarArchive:
    """Where one CIFAR archive lives and how it is laid out.

    Args:
        name: short name (``cifar10``, ``cifar100``).
        url: download address of the ``.tar.gz``.
        filename: the archive's file name on disk.
        md5: published MD5 of the archive.
        folder: the folder the archive extracts to.
        train_files: pickled batches of the training split, in order.
        test_files: pickled batches of the test split.
        label_key: the key of the labels in each batch.
        meta_file: the pickle holding the class names.
        names_key: the key of the class names in ``meta_file``.
    """

    name: str
    url: str
    filename: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarArchive(
    name="cifar10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    filename="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    meta_file="batches.meta",
    names_key="label_names",
)

CIFAR100 = CifarArchive(
    name="cifar100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    filename="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    meta_file="meta",
    names_key="fine_label_names",
)

ARCHIVES: dict[str, CifarArchive] = {"cifar10": CIFAR10, "cifar100": CIFAR100}

SPLITS = ("train", "test")


class CifarSplit(NamedTuple):
    """One split in memory.

    Attributes:
        images: ``uint8`` tensor of shape (N, 3, 32, 32).
        labels: ``long`` tensor of shape (N,).
        classes: class names, indexed by label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


def get_archive(dataset: str | CifarArchive) -> CifarArchive:
    if isinstance(dataset, CifarArchive):
        return dataset
    if dataset not in ARCHIVES:
        raise ValueError(f"dataset must be one of {sorted(ARCHIVES)}, got {dataset!r}")
    return ARCHIVES[dataset]


# --- checksum -------------------------------------------------------------------------------


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str, *, fix: str = "") -> None:
    """Raise :class:`ChecksumMismatchError` naming both checksums unless ``path`` matches."""
    actual = md5sum(path)
    if actual != expected.lower():
        raise ChecksumMismatchError(
            f"MD5 mismatch for {path}: expected {expected.lower()}, got {actual}. The file is "
            "corrupt, incomplete or not the official archive. "
            + (fix or "Delete it and download it again.")
        )


# --- download -------------------------------------------------------------------------------


def download_url(
    url: str,
    destination: str | os.PathLike,
    *,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Stream ``url`` to ``destination`` (via a ``.part`` file), then check its MD5.

    The destination only appears once the download is complete and, when ``md5`` is given,
    verified; an interrupted or corrupted download leaves nothing behind.

    Raises:
        CifarArchiveError: the URL cannot be fetched.
        ChecksumMismatchError: the downloaded bytes do not match ``md5``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            with tqdm(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"Downloading {destination.name}",
                disable=not progress,
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        if md5 is not None:
            verify_md5(
                partial,
                md5,
                fix=f"The download from {url} was damaged; run again to retry. If it keeps "
                f"failing, download the file by hand and place it at {destination}.",
            )
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise CifarArchiveError(
            f"could not download {url}: {err}. Check the network (or proxy settings), or "
            f"download the file by hand and place it at {destination}."
        ) from err
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)
    return destination


# --- extraction -----------------------------------------------------------------------------


def _checked_members(archive: tarfile.TarFile, destination: Path) -> list[tarfile.TarInfo]:
    root = destination.resolve()
    members = []
    for member in archive.getmembers():
        target = (root / member.name).resolve()
        if Path(member.name).is_absolute() or not target.is_relative_to(root):
            raise CifarArchiveError(
                f"refusing to extract {member.name!r}: it would be written outside {root}"
            )
        if not (member.isfile() or member.isdir()):
            raise CifarArchiveError(
                f"refusing to extract {member.name!r}: links and special files are not expected "
                "in a CIFAR archive"
            )
        members.append(member)
    return members


def safe_extract(archive_path: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Extract a ``.tar.gz`` into ``destination``, refusing paths that escape it and links.

    Raises:
        CifarArchiveError: the archive is unreadable or contains an unsafe member.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            members = _checked_members(archive, destination)
            if hasattr(tarfile, "data_filter"):
                archive.extractall(destination, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706 extraction filters
                archive.extractall(destination, members=members)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise CifarArchiveError(
            f"cannot extract {archive_path}: {err}. The archive is corrupt or incomplete; "
            "delete it and download it again."
        ) from err


# --- preparing the extracted folder ---------------------------------------------------------


def _missing_files(folder: Path, archive: CifarArchive) -> list[str]:
    return [name for name in archive.files if not (folder / name).is_file()]


def prepare_cifar(
    root: str | os.PathLike,
    dataset: str | CifarArchive = "cifar100",
    *,
    download: bool = False,
    progress: bool = True,
) -> Path:
    """Make sure the extracted CIFAR folder exists under ``root`` and return its path.

    Uses, in order: an already extracted folder; the archive in ``root`` (checked against its
    MD5, then extracted); a fresh download when ``download`` is true.

    Raises:
        FileNotFoundError: neither folder nor archive exists and ``download`` is false.
        ChecksumMismatchError: the archive's MD5 differs from the published one.
        CifarArchiveError: the archive is unreadable or lacks expected files.
    """
    archive = get_archive(dataset)
    root = Path(root)
    folder = root / archive.folder
    if folder.is_dir() and not _missing_files(folder, archive):
        return folder
    archive_path = root / archive.filename
    if not archive_path.is_file():
        if not download:
            raise FileNotFoundError(
                f"{archive.name} is not under {root}: expected the folder {folder} or the "
                f"archive {archive_path}. Pass download=True (data.init_args.download: true in "
                f"a config) to fetch it from {archive.url}, or download that file by hand and "
                f"place it at {archive_path}."
            )
        download_url(archive.url, archive_path, md5=archive.md5, progress=progress)
    verify_md5(
        archive_path,
        archive.md5,
        fix=f"Delete {archive_path} and run again with download=True, or download "
        f"{archive.url} by hand.",
    )
    # Extract next to the final folder and move it into place, so an interrupted extraction
    # never leaves a half-filled folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        safe_extract(archive_path, staging)
        extracted = staging / archive.folder
        missing = _missing_files(extracted, archive) if extracted.is_dir() else list(archive.files)
        if missing:
            raise CifarArchiveError(
                f"{archive_path} lacks {', '.join(missing)} under {archive.folder}/: it is not "
                f"the official {archive.name} archive. Delete it and download {archive.url}."
            )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(extracted, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- reading --------------------------------------------------------------------------------


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR pickles contain: builtins plus numpy arrays and dtypes.

    (``_codecs.encode`` is how Python 3 writes ``bytes`` at protocol 2; it only builds bytes.)
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "_codecs" and name == "encode":
            return codecs.encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            return getattr(_numpy_multiarray(), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _load_pickle(path: Path) -> dict[str, Any]:
    fix = "Delete the folder and the archive, and prepare the data set again."
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} is missing. {fix}") from err
    except Exception as err:  # unpickling raises many types on corrupt input
        raise CifarArchiveError(f"{path} is not a readable CIFAR pickle ({err}). {fix}") from err
    if not isinstance(content, dict):
        raise CifarArchiveError(f"{path} does not hold a CIFAR batch dict. {fix}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def read_batch(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 array (N, 3, 32, 32), int64 array (N,)).

    Raises:
        CifarArchiveError: the file is not a CIFAR batch (unpicklable, keys or shapes wrong).
    """
    path = Path(path)
    batch = _load_pickle(path)
    fix = "Delete the extracted folder and the archive, and prepare the data set again."
    if "data" not in batch or label_key not in batch:
        raise CifarArchiveError(
            f"{path} lacks 'data' or {label_key!r} (keys: {sorted(batch)}). {fix}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CifarArchiveError(
            f"{path}: 'data' should be uint8 of shape (N, 3072), got {data.dtype} "
            f"{data.shape}. {fix}"
        )
    if labels.shape != (data.shape[0],):
        raise CifarArchiveError(
            f"{path}: {data.shape[0]} images but {labels.shape[0]} labels. {fix}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_class_names(folder: str | os.PathLike, dataset: str | CifarArchive) -> list[str]:
    """The class names stored in the archive's meta file, indexed by label."""
    archive = get_archive(dataset)
    meta = _load_pickle(Path(folder) / archive.meta_file)
    names = meta.get(archive.names_key)
    if names is None:
        raise CifarArchiveError(f"{Path(folder) / archive.meta_file} lacks {archive.names_key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_split(
    folder: str | os.PathLike, dataset: str | CifarArchive, split: str = "train"
) -> CifarSplit:
    """Read one split of an extracted CIFAR folder into tensors."""
    archive = get_archive(dataset)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = archive.train_files if split == "train" else archive.test_files
    parts = [read_batch(Path(folder) / name, archive.label_key) for name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return CifarSplit(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        classes=read_class_names(folder, archive),
    )


def load_cifar(
    root: str | os.PathLike,
    dataset: str | CifarArchive = "cifar100",
    split: str = "train",
    *,
    download: bool = False,
    progress: bool = True,
) -> CifarSplit:
    """Prepare (find, verify, download, extract as needed) and read one CIFAR split.

    Args:
        root: the folder holding the archive and/or its extracted folder.
        dataset: ``"cifar10"``, ``"cifar100"`` or a :class:`CifarArchive`.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        download: fetch the archive when it is not under ``root``.
        progress: show a progress bar while downloading.
    """
    folder = prepare_cifar(root, dataset, download=download, progress=progress)
    return read_split(folder, dataset, split)
