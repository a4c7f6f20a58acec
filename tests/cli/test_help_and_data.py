"""``--help`` lists every subcommand; a clean run prints no warning; any LightningDataModule works."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.cli import SUBCOMMANDS, build_cli, main

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_help_lists_every_subcommand_with_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    listed = {
        line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()
    }
    assert listed == {"fit", "validate", "test", "predict", "study", "export"} == set(SUBCOMMANDS)
    for name, text in SUBCOMMANDS.items():
        assert f"{name}  " in out and text in out


def test_no_subcommand_prints_help_and_fails(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "export" in capsys.readouterr().err


def test_subcommand_help_shows_the_added_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--predictions.path" in out and "--predictions.overwrite" in out and "--untrained" in out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fit_and_collect(argv):
    """Every warning (none hidden by pytest's own filters) and Lightning log line of one fit."""
    handler = _Records()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(argv)
    finally:
        log.removeHandler(handler)
    return [f"{w.category.__name__}: {w.message}" for w in caught], handler.messages


def test_clean_fit_prints_no_warning(tmp_path, monkeypatch):
    """teacher.yaml: its checkpoint folder holds the logger's version_0/ before any checkpoint."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", str(ROOT / "experiments/digits/teacher.yaml"), *QUIET]
    argv += [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
    ]
    argv += ["--trainer.log_every_n_steps=1"]
    caught, logged = _fit_and_collect(argv)
    assert caught == []
    assert not [m for m in logged if "Tip" in m]
    assert (tmp_path / "runs/digits/teacher/teacher.ckpt").is_file()
    # A second run is refused unless it may replace that checkpoint (--overwrite); asked to,
    # it warns that the folder holds one: this warning is real and stays.
    caught, _ = _fit_and_collect([*argv, "--overwrite"])
    assert any("Checkpoint directory" in w and "exists and is not empty" in w for w in caught)


def test_clean_distillation_fit_prints_no_warning(teacher_checkpoint, tmp_path, monkeypatch):
    """A frozen teacher in eval mode, a CSV logger, fast_dev_run: nothing to warn about."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", str(ROOT / "experiments/digits/hinton_kd.yaml"), *QUIET]
    argv += [
        f"--model.init_args.teacher.init_args.checkpoint_path={teacher_checkpoint}",
        "--trainer.fast_dev_run=2",
    ]
    caught, logged = _fit_and_collect(argv)
    assert caught == [] and not [m for m in logged if "Tip" in m]


class TupleData(L.LightningDataModule):
    """A user's own data module: ``(x, y)`` tuples, 8 features, 3 classes."""

    num_classes = 3

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _loader(self, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(48, 8, generator=generator)
        y = torch.randint(0, 3, (48,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


def test_any_lightning_datamodule_with_num_classes_linked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {"fast_dev_run": 2, "logger": False, "enable_progress_bar": False},
        "model": {
            "class_path": "kd_lightning.methods.Supervised",
            "init_args": {
                "model": {
                    "class_path": "kd_lightning.models.MLP",
                    "init_args": {"in_features": 8, "hidden_sizes": [4]},
                }
            },
        },
        "data": {"class_path": f"{__name__.rsplit('.', 1)[0]}.test_help_and_data.TupleData"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "-c", str(path)])
    assert type(cli.datamodule).__name__ == "TupleData"
    assert cli.trainer.global_step == 2
    assert cli.model.num_classes == 3  # linked from data.num_classes
    with torch.no_grad():
        assert cli.model(torch.randn(5, 8)).shape == (5, 3)  # the MLP got num_classes=3 too
