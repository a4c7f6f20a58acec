"""Kind 3 (silent): a checkpoint evaluated on splits other than those held out at its fit is
refused, naming the arguments at fit and now and the fix; the same splits, or arguments that do
not move samples between splits, still evaluate."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from kd_lightning.data import DigitsTransferSet
from kd_lightning.data.split_identity import SplitMismatch, split_digest
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli, trainer


def _module() -> Supervised:
    return Supervised(MLP(hidden_sizes=[8]))


@pytest.mark.parametrize(
    ("command", "changed", "named"),
    [
        ("test", {"split_seed": 1}, "split_seed: 0 at fit, 1 now"),
        ("test", {"test_size": 1000}, "test_size: 360 at fit, 1000 now"),
        ("test", {"split_seed": 7, "test_size": 200}, "--data.init_args.split_seed=0"),
        ("validate", {"val_size": 100}, "val_size: 180 at fit, 100 now"),
        ("validate", {"split_seed": 2}, "--data.init_args.split_seed=0"),
        ("predict", {"split_seed": 1}, "split_seed: 0 at fit, 1 now"),
        ("fit", {"test_size": 300}, "test_size: 360 at fit, 300 now"),
    ],
)
def test_other_splits_than_at_fit_are_refused(
    tmp_path, supervised_checkpoint, command, changed, named
):
    fit = trainer(tmp_path, max_epochs=2)
    run = getattr(fit, command)
    with pytest.raises(SplitMismatch, match="may have been in the training split") as err:
        run(_module(), DigitsTransferSet(batch_size=64, **changed), ckpt_path=supervised_checkpoint)
    assert named in str(err.value)
    assert "train a new checkpoint" in str(err.value)


@pytest.mark.parametrize(
    ("command", "same_splits"),
    [
        ("test", {}),
        ("test", {"labeled_fraction": 0.5}),  # relabels the training split only
        ("test", {"omit_classes": [3]}),  # removes training samples only
        ("test", {"val_size": 100}),  # the test split is the first 360 of the order
        ("validate", {"batch_size": 16}),
        ("predict", {"test_size": 360}),
    ],
)
def test_the_splits_of_the_fit_still_evaluate(
    tmp_path, supervised_checkpoint, command, same_splits
):
    arguments = {"batch_size": 64, **same_splits}
    getattr(trainer(tmp_path), command)(
        _module(), DigitsTransferSet(**arguments), ckpt_path=supervised_checkpoint
    )


def test_the_checkpoint_records_the_split_digests(supervised_checkpoint):
    record = torch.load(supervised_checkpoint, weights_only=True)["kd_lightning"]["data_split"]
    data = DigitsTransferSet()
    data.setup("test")
    assert record["digests"] == {s: split_digest(data.datasets[s]) for s in ("val", "test")}
    assert record["arguments"]["split_seed"] == 0 and record["arguments"]["test_size"] == 360


class OwnData(L.LightningDataModule):
    """A user's data module without a split identity: not checked (documented)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = (
            torch.rand(64, 1, 8, 8, generator=g),
            torch.randint(0, 10, (64,), generator=g),
        )

    def test_dataloader(self):
        return torch.utils.data.DataLoader(list(zip(self.x, self.y, strict=True)), batch_size=32)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_users_own_data_module_is_not_checked(tmp_path, supervised_checkpoint, seed):
    trainer(tmp_path).test(_module(), OwnData(seed), ckpt_path=supervised_checkpoint)


@pytest.mark.parametrize(
    "override", ["--data.init_args.split_seed=1", "--data.init_args.test_size=1000"]
)
def test_cli_test_on_other_splits_exits_with_the_message_first(
    supervised_checkpoint, tmp_path, monkeypatch, capsys, override
):
    monkeypatch.chdir(tmp_path)
    args = ["test", "-c", str(DIGITS / "teacher.yaml"), MLP_MODEL, *TINY[3:], override,
            f"--ckpt_path={supervised_checkpoint}"]  # fmt: skip
    code, err = run_cli(args, capsys)
    first = err.strip().splitlines()[0]
    assert (
        code != 0
        and "training split" in first
        and override.split("=")[0][2:].split(".")[-1] in first
    )
