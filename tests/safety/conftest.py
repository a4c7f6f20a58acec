"""Helpers of the safety tests (issue kinds 1-8): a trainer, weight snapshots to prove that no
optimizer step was taken, a tiny trained checkpoint, and the CLI run in-process."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from kd_lightning.cli import main
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
MLP_MODEL = (
    "--model.init_args.model={class_path: kd_lightning.models.MLP, init_args: {hidden_sizes: [8]}}"
)


TINY_STUDY = {
    "trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
}  # fmt: skip
"""Overrides that make a digits study run a few steps."""


def refused_third_run(tmp_path: Path, third: dict) -> str:
    """The preflight refusal of a 3-run digits study whose third run has overrides ``third``.

    Checks what every such refusal must leave: no checkpoint and no result written.
    """
    from kd_lightning.bench.preflight import PreflightError
    from kd_lightning.bench.study import run_study

    alone = str(DIGITS / "student_alone.yaml")
    runs = [
        {"name": "first", "config": alone, "overrides": TINY_STUDY},
        {"name": "second", "config": alone, "overrides": {**TINY_STUDY, "trainer.max_epochs": 2}},
        {"name": "third", "config": alone, "overrides": {**TINY_STUDY, **third}},
    ]
    spec = {"name": "late", "seeds": [0], "output_dir": str(tmp_path / "out"), "runs": runs}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PreflightError) as error:
        run_study(path, echo=False)
    out = tmp_path / "out"
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("result.json"))
    return str(error.value)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer: equal afterwards means no optimizer step."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``kd-lightning <args>`` in this process: ``(exit status, stderr)``."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def supervised_checkpoint(tmp_path_factory) -> Path:
    """A Supervised MLP(64-8-10) checkpoint after a few steps (a student that exists)."""
    L.seed_everything(0, verbose=False)
    module = Supervised(MLP(hidden_sizes=[8]))
    fit = trainer(tmp_path_factory.mktemp("sup"), limit_val_batches=0)
    fit.fit(module, DigitsTransferSet(batch_size=64))
    path = tmp_path_factory.mktemp("supervised") / "supervised.ckpt"
    fit.save_checkpoint(path)
    return path
