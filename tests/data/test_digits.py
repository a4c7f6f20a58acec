"""The embedded digits transfer set: fixed splits, labeled fraction, omitted classes, batches."""

import torch

from kd_lightning.data import DigitsTransferSet, EpochSeededSampler


def test_fixed_split_sizes_and_seed_independence():
    a, b = DigitsTransferSet(), DigitsTransferSet()
    torch.manual_seed(123)  # the run's seed must not change the split
    b.setup()
    a.setup()
    assert [len(a.dataset(s)) for s in ("train", "val", "test")] == [1257, 180, 360]
    assert torch.equal(a.dataset("test").inputs, b.dataset("test").inputs)
    assert a.input_shape == (1, 8, 8)
    assert (
        0.0 <= float(a.dataset("train").inputs.min())
        and float(a.dataset("train").inputs.max()) <= 1.0
    )


def test_labeled_fraction_keeps_unlabeled_samples_with_target_minus_one():
    data = DigitsTransferSet(labeled_fraction=0.1)
    train = data.dataset("train")
    assert len(train) == 1257  # unlabeled samples stay in the transfer set
    labeled = train.targets >= 0
    assert set(train.targets[~labeled].tolist()) == {-1}
    full = DigitsTransferSet().dataset("train").targets
    # stratified: about 10% of each class keeps its label, and the kept labels are the true ones
    for c in range(10):
        kept = int((train.targets == c).sum())
        assert kept == max(1, round(0.1 * int((full == c).sum())))
    assert torch.equal(train.targets[labeled], full[labeled])


def test_omit_classes_only_from_the_transfer_set():
    data = DigitsTransferSet(omit_classes=[3, 7])
    train_targets = data.dataset("train").targets
    assert not ((train_targets == 3) | (train_targets == 7)).any()
    assert (data.dataset("test").targets == 3).any()
    # index stays the position in the full train split
    assert int(data.dataset("train").indices.max()) < 1257


def test_batches_are_dicts_and_shuffling_depends_on_seed_and_epoch_only():
    data = DigitsTransferSet(batch_size=16, shuffle_seed=5)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input", "target", "index"} and batch["input"].shape == (16, 1, 8, 8)
    sampler = EpochSeededSampler(20, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first and sorted(first) == list(range(20))
