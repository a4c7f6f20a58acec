"""A CIFAR-shaped synthetic transfer set: class-conditional random images, no download.

For tests and benchmarks that need image-shaped data of any size offline. Each class has a
smooth random prototype (random values on a 4x4 grid, bilinearly upsampled); a sample is its
class prototype plus Gaussian pixel noise, stored as ``uint8`` like CIFAR, so the whole
image pipeline (device-side crop/flip, normalisation, teacher cache) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_lightning.data.cifar import ImageTransferSet
from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.transfer_set import Split


def class_conditional_images(
    num_samples: int,
    num_classes: int,
    image_size: int = 32,
    channels: int = 3,
    noise: float = 0.15,
    seed: int = 0,
    prototype_seed: int = 0,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8`` images (N, channels, size, size) and balanced labels (N,), deterministic in the seeds.

    Args:
        num_samples: images to draw.
        num_classes: classes (labels ``i mod num_classes``, shuffled).
        image_size: height and width.
        channels: colour channels.
        noise: standard deviation of the pixel noise, in [0, 1] units.
        seed: seed of labels and noise (differs between splits).
        prototype_seed: seed of the class prototypes (shared by every split of one data set).
        chunk_size: samples generated at a time (bounds the float32 working memory).
    """
    prototypes_generator = torch.Generator().manual_seed(prototype_seed)
    grid = torch.rand(num_classes, channels, 4, 4, generator=prototypes_generator)
    prototypes = F.interpolate(grid, size=(image_size, image_size), mode="bilinear")
    generator = torch.Generator().manual_seed(seed + 1)
    labels = (torch.arange(num_samples) % num_classes)[
        torch.randperm(num_samples, generator=generator)
    ]
    images = torch.empty(num_samples, channels, image_size, image_size, dtype=torch.uint8)
    for start in range(0, num_samples, chunk_size):
        part = labels[start : start + chunk_size]
        noisy = prototypes[part] + noise * torch.randn(
            len(part), channels, image_size, image_size, generator=generator
        )
        images[start : start + len(part)] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


class SyntheticTransferSet(ImageTransferSet):
    """Random class-conditional ``uint8`` images shaped like CIFAR (by default 3x32x32).

    Deterministic in ``data_seed``; the three splits draw different samples around the same
    class prototypes, so a model trained on ``train`` generalises to ``test``.

    Args:
        num_classes: number of classes.
        image_size: height and width of the images.
        channels: colour channels.
        num_samples: training images.
        val_samples: validation images.
        test_samples: test images.
        noise: pixel noise standard deviation in [0, 1] units (larger: harder task).
        data_seed: seed of the generated data.
        augment: random crop (padding 4) and flip of training images, on the device.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        labeled_fraction: fraction of the transfer set that keeps labels, in (0, 1].
        omit_classes: classes removed from the transfer set (kept in val/test).
        split_seed: seed of the labeled subset.
        shuffle_seed: seed of epoch shuffling (default: the run's seed).
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        num_samples: int = 1024,
        val_samples: int = 256,
        test_samples: int = 256,
        noise: float = 0.15,
        data_seed: int = 0,
        augment: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: Sequence[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if num_samples < num_classes:
            raise ValueError(
                f"num_samples ({num_samples}) must be >= num_classes ({num_classes}) so every "
                "class appears"
            )
        if image_size < 1 or channels < 1:
            raise ValueError(f"image_size and channels must be >= 1, got {image_size}, {channels}")
        super().__init__(
            num_classes=num_classes,
            mean=[0.5] * channels,
            std=[0.25] * channels,
            augment=augment,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        self.image_size, self.channels, self.noise = image_size, channels, noise
        self.sizes = {"train": num_samples, "val": val_samples, "test": test_samples}
        self.data_seed = data_seed

    def load_split(self, split: str) -> Split:
        offset = {"train": 0, "val": 1, "test": 2}[split]
        return class_conditional_images(
            self.sizes[split],
            self.num_classes,
            self.image_size,
            self.channels,
            self.noise,
            seed=self.data_seed * 3 + offset,
            prototype_seed=self.data_seed,
        )
