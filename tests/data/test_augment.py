"""Batched CIFAR augmentation: crop/flip against a per-image reference, replayable parameters,
normalisation by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data.augment import (
    CIFAR_MEAN_STD,
    CifarAugment,
    CifarNormalize,
    crop_flip,
    params_for,
)


def images(batch: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (batch, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return torch.rand(batch, 3, 32, 32, generator=generator, dtype=dtype)


def params(oy, ox, flip) -> dict[str, torch.Tensor]:
    return {
        "offsets_y": torch.tensor(oy),
        "offsets_x": torch.tensor(ox),
        "flip": torch.tensor(flip, dtype=torch.bool),
    }


def reference(x: torch.Tensor, p: dict[str, torch.Tensor], padding: int = 4) -> torch.Tensor:
    """torchvision's order, one image at a time: pad, crop at (top, left), then flip."""
    out = []
    for image, top, left, flip in zip(x, p["offsets_y"], p["offsets_x"], p["flip"], strict=True):
        padded = F.pad(image, (padding,) * 4)
        crop = padded[:, top : top + 32, left : left + 32]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def test_centre_offsets_return_the_original() -> None:
    x = images()
    assert torch.equal(crop_flip(x, params([4] * 6, [4] * 6, [False] * 6)), x)


def test_zero_offsets_take_the_padded_top_left_corner() -> None:
    x = images(2)
    out = crop_flip(x, params([0, 0], [0, 0], [False, False]))
    assert torch.equal(out[:, :, 4:, 4:], x[:, :, :28, :28])
    assert (out[:, :, :4] == 0).all() and (out[:, :, :, :4] == 0).all()  # zero padding


def test_flip_once_mirrors_and_twice_is_identity() -> None:
    x = images()
    flip = params([4] * 6, [4] * 6, [True] * 6)
    once = crop_flip(x, flip)
    assert torch.equal(once, x.flip(-1))
    assert torch.equal(crop_flip(once, flip), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_matches_per_image_reference_for_random_params(dtype: torch.dtype) -> None:
    x = images(64, dtype)
    p = CifarAugment().sample_params(64, torch.Generator().manual_seed(3))
    assert torch.equal(crop_flip(x, p), reference(x, p))


def test_params_for_is_independent_of_batch_composition() -> None:
    indices = torch.tensor([5, 17, 123456789, 0, 42, 2**40 + 3])
    whole = params_for(indices, view=2, seed=7)
    order = torch.tensor([3, 5, 0, 4, 1, 2])
    shuffled = params_for(indices[order], view=2, seed=7)
    alone = params_for(indices[2:3], view=2, seed=7)
    for key in whole:
        assert torch.equal(shuffled[key], whole[key][order])
        assert torch.equal(alone[key], whole[key][2:3])
    per_sample_views = params_for(indices, view=torch.full((6,), 2), seed=7)
    assert all(torch.equal(per_sample_views[k], whole[k]) for k in whole)


def test_views_and_seeds_give_different_params() -> None:
    indices = torch.arange(2000)

    def stacked(view: int, seed: int) -> torch.Tensor:
        p = params_for(indices, view, seed)
        return torch.stack([p["offsets_y"], p["offsets_x"], p["flip"].long()])

    base = stacked(0, 0)
    for other in (stacked(1, 0), stacked(0, 1)):
        # Independent draws agree on all three values with probability 1/9 * 1/9 * 1/2.
        same = (base == other).all(0).float().mean().item()
        assert same < 0.03


def test_offsets_cover_the_whole_range_uniformly() -> None:
    n = 9000
    p = params_for(torch.arange(n), view=0, seed=1234)
    for key in ("offsets_y", "offsets_x"):
        counts = torch.bincount(p[key], minlength=9)
        assert counts.numel() == 9  # nothing outside 0..8
        expected = n / 9
        chi2 = (((counts - expected) ** 2) / expected).sum().item()
        assert chi2 < 26.1, counts  # chi-square, 8 dof, p = 0.001
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.02
    # Horizontal and vertical offsets are not tied to each other.
    assert (p["offsets_y"] == p["offsets_x"]).float().mean().item() < 0.15


def test_sample_params_follow_the_generator() -> None:
    augment = CifarAugment()
    first = augment.sample_params(500, torch.Generator().manual_seed(9))
    again = augment.sample_params(500, torch.Generator().manual_seed(9))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert set(first["offsets_y"].tolist()) == set(range(9))
    assert set(first["offsets_x"].tolist()) == set(range(9))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_normalisation_matches_hand_formula(dataset: str) -> None:
    mean, std = CIFAR_MEAN_STD[dataset]
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = torch.tensor([0.0, 0.5, 1.0])
    out = CifarNormalize(dataset)(x)
    for c, value in enumerate((0.0, 0.5, 1.0)):
        assert out[0, c, 0, 0].item() == pytest.approx((value - mean[c]) / std[c], rel=1e-6)
        assert out[0, c, 1, 1].item() == pytest.approx(-mean[c] / std[c], rel=1e-6)
    as_bytes = CifarNormalize(dataset)(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert as_bytes[0, 0, 0, 0].item() == pytest.approx((1 - mean[0]) / std[0], rel=1e-6)


def test_augment_pads_before_normalising_and_replays_params() -> None:
    augment = CifarAugment("cifar100")
    x = images(4, torch.uint8)
    p = augment.params_for(torch.arange(4), view=0, seed=0)
    p["offsets_y"][0] = 0  # the first image shows 4 rows of padding
    out = augment(x, params=p)
    mean, std = CIFAR_MEAN_STD["cifar100"]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[0, 0, :4], torch.full((4, 32), -mean[0] / std[0]))
    assert torch.equal(out, augment.apply(x.float() / 255, p))
    assert torch.equal(augment(x, params=p), out)


def test_unnormalised_float_output_in_unit_range() -> None:
    out = CifarAugment(normalize=False)(images(4, torch.uint8), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="cifar100"):
        CifarNormalize("imagenet")
    with pytest.raises(ValueError, match="flip_p"):
        CifarAugment(flip_p=1.5)
    with pytest.raises(ValueError, match="one value per image"):
        crop_flip(images(2), params([0], [0], [False]))
