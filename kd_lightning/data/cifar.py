"""CIFAR-10 / CIFAR-100 transfer sets without torchvision, augmented batched on the device.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. The archives are
downloaded, MD5-checked, extracted and read by :mod:`kd_lightning.data.cifar_archive`. Images stay
``uint8`` until they reach the accelerator (4x less host-to-device traffic than float32); the
standard training augmentation (random 32x32 crop of the image zero-padded by 4, horizontal flip
with probability 0.5, per-channel normalisation; He et al. 2016, and the CRD benchmark) then runs
on whole batches in :meth:`~ImageTransferSet.on_after_batch_transfer`, on the GPU when there is
one. Validation and test batches are only normalised.

The augmentation parameters of view ``v`` of training image ``i`` are a function of
``(seed, i, v)`` (:func:`kd_lightning.data.augment.params_for`), so a teacher-output cache can
store the teacher's output on exactly the images the student will see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd_lightning.data.augment import CIFAR_MEAN_STD, CifarNormalize, crop_flip, params_for
from kd_lightning.data.cifar_archive import CifarSplit, get_archive, prepare_cifar, read_split
from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.transfer_set import Split, TransferSetDataModule


class ImageTransferSet(TransferSetDataModule):
    """Base of image transfer sets stored as ``uint8`` (N, C, H, W): crop/flip + normalise on the device.

    Subclasses implement :meth:`load_split` returning ``uint8`` images (float images in [0, 1]
    work too).

    Args:
        num_classes: number of classes.
        mean: per-channel mean (in [0, 1] units) to normalise with.
        std: per-channel standard deviation.
        augment: random crop (zero padding ``padding``) and horizontal flip of training images.
        padding: zero padding on each side before cropping back to the image size.
        flip_p: probability of a horizontal flip.
        **kwargs: the :class:`~kd_lightning.data.TransferSetDataModule` arguments.
    """

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = True,
        padding: int = 4,
        flip_p: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.augment, self.padding, self.flip_p = augment, padding, flip_p
        self.normalize = CifarNormalize(mean=list(mean), std=list(std))

    @property
    def augments_train(self) -> bool:
        return self.augment and (self.padding > 0 or self.flip_p > 0)

    def transform_settings(self) -> dict[str, Any]:
        normalise = {
            "mean": [round(float(m), 6) for m in self.normalize.mean.flatten()],
            "std": [round(float(s), 6) for s in self.normalize.std.flatten()],
        }
        crop_flip_settings = (
            {"crop_padding": self.padding, "flip_p": self.flip_p} if self.augments_train else {}
        )
        return {"train": {**crop_flip_settings, **normalise}, "eval": normalise}

    def transform_batch(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        images = batch["input"]
        if split == "train" and self.augments_train:
            index = batch["index"]
            view = batch.get("view")
            view = torch.zeros_like(index) if view is None else view
            params = params_for(
                index, view, self.augment_seed, padding=self.padding, flip_p=self.flip_p
            )
            images = crop_flip(images, params, self.padding)
        return {**batch, "input": self.normalize(images)}


class _CifarTransferSet(ImageTransferSet):
    dataset_name = "cifar100"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        val_size: int = 0,
        augment: bool = True,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        mean, std = CIFAR_MEAN_STD[self.dataset_name]
        super().__init__(
            num_classes=10 if self.dataset_name == "cifar10" else 100,
            mean=mean,
            std=std,
            augment=augment,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        if not 0 <= val_size < 50_000:
            raise ValueError(f"val_size must be in [0, 50000), got {val_size}")
        self.root, self.download, self.val_size = Path(root), download, val_size
        self.archive = get_archive(self.dataset_name)
        self._splits: dict[str, Split] | None = None

    def prepare_data(self) -> None:
        prepare_cifar(self.root, self.archive, download=self.download)
        super().prepare_data()

    def _read(self, split: str) -> CifarSplit:
        folder = prepare_cifar(self.root, self.archive, download=self.download)
        return read_split(folder, self.archive, split)

    def load_split(self, split: str) -> Split:
        if self._splits is None:
            train, test = self._read("train"), self._read("test")
            if self.val_size == 0:
                splits = {"train": (train.images, train.labels), "val": (test.images, test.labels)}
            else:
                order = torch.randperm(
                    len(train.labels), generator=torch.Generator().manual_seed(self.split_seed)
                )
                val, rest = order[: self.val_size], order[self.val_size :].sort().values
                splits = {
                    "train": (train.images[rest], train.labels[rest]),
                    "val": (train.images[val], train.labels[val]),
                }
            self._splits = {**splits, "test": (test.images, test.labels)}
        return self._splits[split]


class CIFAR10TransferSet(_CifarTransferSet):
    """CIFAR-10 (50,000 training / 10,000 test 32x32 colour images, 10 classes) as a transfer set.

    The archive is read from ``root`` (downloaded there with ``download: true``). Training images
    are augmented on the device (pad 4 + random crop, horizontal flip) and normalised with
    CIFAR-10's channel statistics; validation and test images are only normalised.

    Args:
        root: folder holding the archive and/or its extracted folder.
        download: fetch the archive (with MD5 check) when it is not under ``root``.
        batch_size: samples per batch.
        num_workers: DataLoader workers (batches are cheap to gather: 0 is usually fastest).
        labeled_fraction: fraction of the transfer set that keeps labels, in (0, 1].
        omit_classes: classes removed from the transfer set (kept in val/test).
        split_seed: seed of the validation hold-out and labeled subset.
        shuffle_seed: seed of epoch shuffling and, without a cache, of the augmentation.
        val_size: training images held out for validation; 0 validates on the test set (the
            usual CIFAR distillation protocol, e.g. CRD).
        augment: random crop and flip of training images.
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
    """

    dataset_name = "cifar10"


class CIFAR100TransferSet(_CifarTransferSet):
    """CIFAR-100 (50,000 training / 10,000 test 32x32 colour images, 100 classes) as a transfer set.

    The benchmark of the CRD/RepDistiller distillation protocol. Same arguments and pipeline as
    :class:`CIFAR10TransferSet`, normalised with CIFAR-100's channel statistics.

    Args:
        root: folder holding the archive and/or its extracted folder.
        download: fetch the archive (with MD5 check) when it is not under ``root``.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        labeled_fraction: fraction of the transfer set that keeps labels, in (0, 1].
        omit_classes: classes removed from the transfer set (kept in val/test).
        split_seed: seed of the validation hold-out and labeled subset.
        shuffle_seed: seed of epoch shuffling and, without a cache, of the augmentation.
        val_size: training images held out for validation; 0 validates on the test set.
        augment: random crop and flip of training images.
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
    """

    dataset_name = "cifar100"
