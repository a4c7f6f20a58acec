"""Batched CIFAR augmentation on tensors: random crop with zero padding, horizontal flip,
normalisation, on any device, without a Python loop over images.

The standard CIFAR recipe (He et al., "Deep Residual Learning for Image Recognition", CVPR
2016, §4.2; the CRD benchmark uses the same): pad 4 pixels of zeros on each side, take a random
32x32 crop, flip horizontally with probability 0.5, then normalise per channel. Padding is
applied before normalisation, as with torchvision's ``RandomCrop(32, padding=4)`` followed by
``ToTensor`` and ``Normalize``, so padded pixels are black.

The random parameters are explicit, so a view can be replayed exactly:

- :meth:`CifarAugment.sample_params` draws them from a ``torch.Generator``;
- :func:`params_for` derives them from ``(seed, sample index, view)`` with a counter-based hash,
  so the parameters of a sample do not depend on which batch it lands in or on its position
  there (what a teacher-output cache needs to recompute view ``k`` of sample ``i``);
- :meth:`CifarAugment.apply` applies given parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Per-channel mean / std of the training images, in [0, 1] units. CIFAR-100's are the values
#: the CRD benchmark normalises with; CIFAR-10's are the per-pixel statistics of its training set.
CIFAR_MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

AugmentParams = dict[str, torch.Tensor]
"""``offsets_y``, ``offsets_x`` (long, (B,), in ``[0, 2 * padding]``) and ``flip`` (bool, (B,)).
Offsets index the top-left corner of the crop in the padded image."""

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' "lowbias32"): every input bit affects every output
    bit, so consecutive counters give independent-looking values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fold a 64-bit integer into a 32-bit hash state (low half, then high half)."""
    state = _hash32(state ^ (value & _MASK32))
    return _hash32(state ^ ((value >> 32) & _MASK32))


def _uniform_below(bits: torch.Tensor, bound: int) -> torch.Tensor:
    """Map 32 uniform bits to [0, bound) by multiply-shift (bias below bound / 2**32)."""
    return (bits * bound) >> 32


def params_for(
    indices: torch.Tensor | Sequence[int],
    view: int | torch.Tensor,
    seed: int,
    *,
    padding: int = 4,
    flip_p: float = 0.5,
) -> AugmentParams:
    """Crop/flip parameters determined by ``(seed, index, view)`` alone, vectorised.

    The same triple always gives the same parameters, on any device, whatever the batch it is
    part of; different views of one sample (or different seeds) give independent parameters.

    Args:
        indices: sample indices, shape (B,) (e.g. a batch's ``index`` entry).
        view: which augmented view of each sample (an int, or a (B,) tensor).
        seed: the run's augmentation seed (any non-negative int below 2**63).
        padding: zero padding on each side; offsets are drawn from ``[0, 2 * padding]``.
        flip_p: probability of a horizontal flip.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if seed < 0 or seed >= 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if (indices < 0).any():
        raise ValueError("indices must be non-negative")
    device = indices.device
    views = torch.as_tensor(view, dtype=torch.long, device=device).expand_as(indices)
    state = _absorb(torch.zeros_like(indices), torch.full_like(indices, seed))
    state = _absorb(_absorb(state, indices), views)
    draws = [_hash32(state ^ stream) for stream in (0x9E3779B9, 0x7F4A7C15, 0x5BD1E995)]
    return {
        "offsets_y": _uniform_below(draws[0], 2 * padding + 1),
        "offsets_x": _uniform_below(draws[1], 2 * padding + 1),
        "flip": draws[2] < int(flip_p * 2**32),
    }


def crop_flip(images: torch.Tensor, params: AugmentParams, padding: int = 4) -> torch.Tensor:
    """Zero-pad, crop at the given offsets (to the input size) and flip where asked.

    One gather over the flattened padded images; works for any dtype (uint8 or float) and
    device. ``images`` is (B, C, H, W); the output has the same shape.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    device = images.device
    offsets_y = params["offsets_y"].to(device=device, dtype=torch.long)
    offsets_x = params["offsets_x"].to(device=device, dtype=torch.long)
    flip = params["flip"].to(device=device, dtype=torch.bool)
    if not (offsets_y.shape == offsets_x.shape == flip.shape == (batch,)):
        raise ValueError(f"params must hold one value per image ({batch}) for each key")
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    rows = offsets_y[:, None] + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + offsets_x[:, None]
    flat_index = (rows[:, :, None] * padded_width + columns[:, None, :]).view(batch, 1, -1)
    cropped = padded.flatten(2).gather(2, flat_index.expand(batch, channels, -1))
    return cropped.view(batch, channels, height, width)


class CifarNormalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) images in [0, 1] (uint8 is scaled by 1/255).

    Args:
        dataset: ``cifar10`` or ``cifar100`` for the published statistics; ignored when both
            ``mean`` and ``std`` are given.
        mean: per-channel mean, overriding the data set's.
        std: per-channel standard deviation, overriding the data set's.
    """

    def __init__(
        self,
        dataset: str = "cifar100",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (mean is None or std is None) and dataset not in CIFAR_MEAN_STD:
            raise ValueError(f"dataset must be one of {sorted(CIFAR_MEAN_STD)}, got {dataset!r}")
        default_mean, default_std = CIFAR_MEAN_STD.get(dataset, (None, None))
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        mean = self.mean.to(device=images.device, dtype=images.dtype)
        std = self.std.to(device=images.device, dtype=images.dtype)
        return (images - mean) / std


class CifarAugment(nn.Module):
    """The CIFAR training transform on batches: pad-crop, horizontal flip, normalise.

    ``forward(images)`` draws fresh parameters (from ``generator`` when given) and applies them;
    ``forward(images, params=...)`` replays given ones. Accepts uint8 or float images in [0, 1],
    shape (B, C, H, W), on any device; returns normalised float images of the same shape.

    Args:
        dataset: ``cifar10`` or ``cifar100``: whose mean/std to normalise with.
        padding: zero padding on each side before cropping back to the input size.
        flip_p: probability of a horizontal flip.
        normalize: whether to normalise (False returns augmented images in [0, 1]).
    """

    def __init__(
        self,
        dataset: str = "cifar100",
        padding: int = 4,
        flip_p: float = 0.5,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.padding = padding
        self.flip_p = flip_p
        self.normalize = CifarNormalize(dataset) if normalize else None

    def sample_params(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> AugmentParams:
        """Draw parameters for ``batch_size`` images (on the generator's device, then moved)."""
        draw_device = generator.device if generator is not None else device
        offsets = torch.randint(
            0, 2 * self.padding + 1, (2, batch_size), generator=generator, device=draw_device
        )
        flip = torch.rand(batch_size, generator=generator, device=draw_device) < self.flip_p
        params = {"offsets_y": offsets[0], "offsets_x": offsets[1], "flip": flip}
        return {key: value.to(device) for key, value in params.items()} if device else params

    def params_for(
        self, indices: torch.Tensor | Sequence[int], view: int | torch.Tensor, seed: int
    ) -> AugmentParams:
        """Parameters fixed by ``(seed, index, view)``; see :func:`params_for`."""
        return params_for(indices, view, seed, padding=self.padding, flip_p=self.flip_p)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop/flip with ``params``, then convert to float and normalise."""
        out = crop_flip(images, params, self.padding)
        if self.normalize is not None:
            return self.normalize(out)
        return out.float() / 255 if out.dtype == torch.uint8 else out

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        params: AugmentParams | None = None,
    ) -> torch.Tensor:
        if params is None:
            params = self.sample_params(images.shape[0], generator, images.device)
        return self.apply(images, params)
