"""CIFAR and synthetic transfer sets: archive -> batches, device-side augmentation, replayable views."""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data.augment import CIFAR_MEAN_STD, params_for
from kd_lightning.data.cifar import CIFAR10TransferSet, CIFAR100TransferSet
from kd_lightning.data.cifar_archive import CIFAR10, CIFAR100, md5sum
from kd_lightning.data.synthetic import SyntheticTransferSet, class_conditional_images
from kd_lightning.methods import Supervised

PER_FILE = 8


def write_archive(directory: Path, dataset_cls) -> tuple[str, dict[str, np.ndarray]]:
    """A tar.gz in the official layout with PER_FILE images per batch file; returns (URL, data)."""
    base = CIFAR10 if dataset_cls is CIFAR10TransferSet else CIFAR100
    rng = np.random.default_rng(0)
    folder = directory / "source" / base.folder
    folder.mkdir(parents=True)
    classes = 10 if base is CIFAR10 else 100
    content = {}
    for name in (*base.train_files, *base.test_files):
        data = rng.integers(0, 256, size=(PER_FILE, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=PER_FILE)
        content[name] = (data, labels)
        batch = {b"data": data, base.label_key.encode(): labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {base.names_key.encode(): [f"c{i}".encode() for i in range(classes)]}
    (folder / base.meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    archive = directory / "source" / base.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=base.folder)
    spec = dataclasses.replace(base, url=archive.as_uri(), md5=md5sum(archive))
    return spec, content


def images_of(content, names) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([content[n][0] for n in names])).view(-1, 3, 32, 32)


def normalised(images: torch.Tensor, dataset: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_MEAN_STD[dataset])
    return (images.float() / 255 - mean) / std


def reference_view(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """One image, torchvision's order: zero-pad 4, crop 32x32 at (top, left), flip."""
    crop = F.pad(image, (4, 4, 4, 4))[:, top : top + 32, left : left + 32]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize("dataset_cls", [CIFAR10TransferSet, CIFAR100TransferSet])
def test_download_read_and_normalise(tmp_path, dataset_cls):
    spec, content = write_archive(tmp_path, dataset_cls)
    dm = dataset_cls(root=str(tmp_path / "data"), download=True, batch_size=4, shuffle_seed=0)
    dm.archive = spec  # the test archive's URL and MD5 instead of the official ones
    dm.prepare_data()
    dm.setup()
    name = spec.name
    assert dm.num_classes == (10 if name == "cifar10" else 100)
    train = dm.dataset("train")
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (
        PER_FILE * len(spec.train_files),
        3,
        32,
        32,
    )
    assert torch.equal(train.inputs, images_of(content, spec.train_files))
    # val_size=0: validation is the test split (the CIFAR distillation protocol).
    assert torch.equal(dm.dataset("val").inputs, images_of(content, spec.test_files))
    batch = next(iter(dm.val_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)  # no trainer: evaluation transform
    torch.testing.assert_close(out["input"], normalised(batch["input"], name))
    assert torch.equal(out["target"], torch.as_tensor(content[spec.test_files[0]][1][:4]))


def test_missing_data_without_download_says_how_to_fix(tmp_path):
    dm = CIFAR100TransferSet(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.prepare_data()


def test_validation_hold_out_is_fixed_and_disjoint(tmp_path):
    spec, content = write_archive(tmp_path, CIFAR10TransferSet)
    splits = []
    for _ in range(2):
        dm = CIFAR10TransferSet(root=str(tmp_path / "data"), download=True, val_size=10)
        dm.archive = spec
        dm.prepare_data()
        splits.append((dm.raw_split("train")[0], dm.raw_split("val")[0]))
    (train, val), (train2, val2) = splits
    assert len(train) == PER_FILE * 5 - 10 and len(val) == 10
    assert torch.equal(train, train2) and torch.equal(val, val2)
    every = images_of(content, spec.train_files).flatten(1)
    rows = lambda x: {bytes(r.numpy()) for r in x.flatten(1)}  # noqa: E731
    assert rows(train).isdisjoint(rows(val)) and rows(train) | rows(val) == rows(every)


class _RecordInputs(L.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, dict]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, {k: v.clone() for k, v in batch.items()}))


def test_training_batches_are_augmented_after_transfer_and_replayable(tmp_path):
    spec, content = write_archive(tmp_path, CIFAR10TransferSet)
    dm = CIFAR10TransferSet(
        root=str(tmp_path / "data"), download=True, batch_size=8, shuffle_seed=3
    )
    dm.archive = spec
    record = _RecordInputs()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    fit = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        callbacks=[record],
    )  # fmt: skip
    fit.fit(Supervised(model), dm)
    raw = images_of(content, spec.train_files)
    seen: dict[int, list[torch.Tensor]] = {}
    for epoch, batch in record.batches:
        assert batch["input"].dtype == torch.float32  # uint8 on the host, float after transfer
        assert torch.equal(batch["view"], torch.full_like(batch["index"], epoch))
        p = params_for(batch["index"], batch["view"], seed=3)
        for i, index in enumerate(batch["index"].tolist()):
            want = reference_view(
                raw[index], int(p["offsets_y"][i]), int(p["offsets_x"][i]), bool(p["flip"][i])
            )
            torch.testing.assert_close(batch["input"][i], normalised(want[None], "cifar10")[0])
            seen.setdefault(index, []).append(batch["input"][i])
    assert len(seen) == len(raw)
    # A new, replayable augmentation each epoch: most images differ between the two epochs.
    assert sum(not torch.equal(a, b) for a, b in seen.values()) >= len(raw) * 3 // 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_transform_matches_the_cpu():
    dm = SyntheticTransferSet(num_samples=64, augment=True, shuffle_seed=0)
    batch = dm.dataset("train").__getitems__([(i, 2) for i in range(64)])
    on_gpu = dm.transform_batch({k: v.cuda() for k, v in batch.items()}, "train")
    torch.testing.assert_close(on_gpu["input"].cpu(), dm.transform_batch(batch, "train")["input"])


def test_synthetic_set_is_deterministic_balanced_and_class_conditional():
    images, labels = class_conditional_images(200, 10, seed=0, prototype_seed=0)
    again, labels_again = class_conditional_images(200, 10, seed=0, prototype_seed=0)
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert torch.bincount(labels).tolist() == [20] * 10
    dm = SyntheticTransferSet(num_classes=10, image_size=16, channels=1, num_samples=300)
    train_x, train_y = dm.raw_split("train")
    test_x, test_y = dm.raw_split("test")
    assert train_x.shape == (300, 1, 16, 16) and not torch.equal(train_x[:256], test_x)
    # Class means of the training split classify the test split: the classes are learnable.
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(10)])
    distance = torch.cdist(test_x.float().flatten(1), means.flatten(1))
    assert (distance.argmin(1) == test_y).float().mean() > 0.9
    with pytest.raises(ValueError, match="every class"):
        SyntheticTransferSet(num_classes=10, num_samples=5)
