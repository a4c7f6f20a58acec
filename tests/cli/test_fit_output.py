"""What ``kd-lightning fit`` writes and prints: ``best.ckpt``/``last.ckpt``/``config.yaml`` in
the run's own versioned folder, one line per epoch off a terminal, a summary with the paths,
and for the W&B logger the offline run's folder and its ``wandb sync`` command.

The expected values come from the CSV logger's ``metrics.csv`` of the same run (written by
Lightning, not by the code under test) and from the checkpoints' own ``epoch`` field.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from kd_lightning.callbacks.progress import EpochLines, FitSummary
from kd_lightning.cli import main
from kd_lightning.cli_run_files import prepare_fit
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "experiments" / "digits"
TINY = [
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false",
]


def _val_acc_per_epoch(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as f:
        return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]


def _ckpt_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """student_alone.yaml, 3 tiny epochs, stdout a pipe (not a terminal), run twice."""
    folder = tmp_path_factory.mktemp("fit")
    outputs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for _ in range(2):
            stream = io.StringIO()
            patch.setattr("sys.stdout", stream)
            main(["fit", "-c", str(DIGITS / "student_alone.yaml"), *TINY])
            outputs.append(stream.getvalue())
    return folder, outputs


def test_off_a_terminal_fit_prints_one_line_per_epoch_with_loss_and_accuracy(fitted):
    folder, (out, _) = fitted
    accuracies = _val_acc_per_epoch(folder / "runs/digits/student_alone/version_0/metrics.csv")
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line, accuracy in zip(lines, accuracies, strict=True):
        assert "train/loss " in line
        assert f"val/acc {accuracy:.4f}" in line
    assert "\r" not in out  # no progress-bar frames in a log


def test_summary_line_names_last_and_best_validation(fitted):
    folder, (out, _) = fitted
    accuracies = _val_acc_per_epoch(folder / "runs/digits/student_alone/version_0/metrics.csv")
    best = max(accuracies)
    best_epoch = accuracies.index(best) + 1  # first epoch reaching it, 1-based
    assert (
        f"fit done: val/acc {accuracies[-1]:.4f} at epoch 3 (best {best:.4f} at epoch {best_epoch})"
        in out.splitlines()
    )


def test_best_and_last_checkpoints_in_the_versioned_run_folder(fitted):
    folder, (first, second) = fitted
    run = Path("runs/digits/student_alone/version_0")
    assert sorted(p.name for p in (folder / run / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    accuracies = _val_acc_per_epoch(folder / run / "metrics.csv")
    best_epoch = accuracies.index(max(accuracies))  # 0-based, as checkpoints store it
    assert _ckpt_epoch(folder / run / "checkpoints/best.ckpt") == best_epoch
    assert _ckpt_epoch(folder / run / "checkpoints/last.ckpt") == 2
    config = yaml.safe_load((folder / run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "kd_lightning.methods.Supervised"
    for name in ("best.ckpt", "last.ckpt"):
        assert f"  {name} -> {run / 'checkpoints' / name}" in first.splitlines()
    assert f"  config.yaml -> {run / 'config.yaml'}" in first.splitlines()
    # The second run has its own folder; the first run's files are untouched.
    assert (
        f"  best.ckpt -> {Path('runs/digits/student_alone/version_1/checkpoints/best.ckpt')}"
        in (second.splitlines())
    )
    assert _ckpt_epoch(folder / run / "checkpoints/last.ckpt") == 2


def test_a_config_with_its_own_checkpoint_keeps_it_and_gains_best_and_last(tmp_path, monkeypatch):
    """teacher.yaml writes the stable teacher.ckpt the distillation configs read."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(DIGITS / "teacher.yaml"), *TINY, "--trainer.max_epochs=1"])
    assert (tmp_path / "runs/digits/teacher/teacher.ckpt").is_file()
    folder = tmp_path / "runs/digits/teacher/version_0"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    hinton = yaml.safe_load((DIGITS / "hinton_kd.yaml").read_text())
    teacher = hinton["model"]["init_args"]["teacher"]["init_args"]["checkpoint_path"]
    assert teacher == "runs/digits/teacher/teacher.ckpt"


# ----------------------------------------------------------------- prepare_fit on a bare trainer
def _trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", enable_model_summary=False, **kwargs)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _checkpoints(trainer):
    return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]


def test_default_checkpoint_uses_the_methods_monitor_and_replaces_lightnings():
    model = Supervised(MLP(10, hidden_sizes=[4]))
    trainer = _trainer()
    prepare_fit(trainer, model, [], stream=io.StringIO())
    (only,) = _checkpoints(trainer)
    assert (only.monitor, only.mode, only.filename, only.save_last) == (
        "val/acc",
        "max",
        "best",
        True,
    )
    assert type(trainer.callbacks[-1]) is ModelCheckpoint  # checkpoints run after the rest
    assert isinstance(trainer.callbacks[0], FitSummary)


def test_own_checkpoints_elsewhere_keep_the_default_beside_them(tmp_path):
    model = Supervised(MLP(10, hidden_sizes=[4]))
    logger = CSVLogger(tmp_path)
    elsewhere = ModelCheckpoint(dirpath="somewhere", filename="teacher")
    trainer = _trainer(callbacks=[elsewhere], logger=logger)
    prepare_fit(trainer, model, [elsewhere], stream=io.StringIO())
    assert [c.filename for c in _checkpoints(trainer)] == ["teacher", "best"]
    # Without a logger the run has no folder of its own: the config's choice stands alone.
    trainer = _trainer(callbacks=[elsewhere])
    prepare_fit(trainer, model, [elsewhere], stream=io.StringIO())
    assert _checkpoints(trainer) == [elsewhere]
    in_run_folder = ModelCheckpoint(filename="{epoch}")
    trainer = _trainer(callbacks=[in_run_folder], logger=logger)
    prepare_fit(trainer, model, [in_run_folder], stream=io.StringIO())
    assert _checkpoints(trainer) == [in_run_folder]
    trainer = _trainer(enable_checkpointing=False, logger=logger)
    prepare_fit(trainer, model, [], stream=io.StringIO())
    assert _checkpoints(trainer) == []


def test_epoch_lines_replace_lightnings_bar_only_off_a_terminal():
    model = Supervised(MLP(10, hidden_sizes=[4]))
    trainer = _trainer(callbacks=[TQDMProgressBar()])  # Lightning's default, as if added by it
    prepare_fit(trainer, model, [], stream=io.StringIO())
    assert isinstance(trainer.progress_bar_callback, EpochLines)
    trainer = _trainer(callbacks=[TQDMProgressBar()])
    prepare_fit(trainer, model, [], stream=_Terminal())
    assert type(trainer.progress_bar_callback) is TQDMProgressBar
    chosen = TQDMProgressBar(refresh_rate=5)  # listed by the user's config: kept
    trainer = _trainer(callbacks=[chosen])
    prepare_fit(trainer, model, [chosen], stream=io.StringIO())
    assert trainer.progress_bar_callback is chosen


# ----------------------------------------------------------------- W&B
def test_wandb_fit_writes_config_in_its_run_folder_and_prints_the_sync_command(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", str(DIGITS / "student_alone.yaml"), *TINY, "--trainer.max_epochs=1"]
    argv += [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.save_dir=runs",
        "--trainer.logger.init_args.offline=true",
        "--trainer.logger.init_args.project=kd-test",
    ]
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    (where,) = [line for line in lines if line.startswith("W&B offline run: ")]
    run_folder = where.removeprefix("W&B offline run: ")
    assert re.fullmatch(r"runs/wandb/offline-run-\d{8}_\d{6}-(\w+)", run_folder)
    run_id = run_folder.rsplit("-", 1)[1]
    assert (tmp_path / run_folder / f"run-{run_id}.wandb").is_file()
    assert lines[lines.index(where) + 1] == f"  upload it with: wandb sync {run_folder}"
    # config and checkpoints in the run's own folder <save_dir>/<project>/<run id>/
    own = tmp_path / "runs" / "kd-test" / run_id
    assert (own / "config.yaml").is_file() and not (tmp_path / "runs" / "config.yaml").exists()
    assert sorted(p.name for p in (own / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_wandb_study_prints_where_the_offline_runs_are(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from kd_lightning.bench.study import run_study

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = {
        "name": "tiny",
        "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "wandb": {"project": "kd-test", "mode": "offline"},
        "latency": False,
        "runs": [{"name": "student_alone", "config": str(DIGITS / "student_alone.yaml")}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    overrides = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    overrides["trainer.limit_val_batches"] = 1
    run_study(path, overrides=overrides)
    lines = capsys.readouterr().out.splitlines()
    folder = tmp_path / "out" / "wandb" / "wandb"
    runs = sorted(folder.glob("offline-run-*"))
    assert len(runs) == 2  # the run and the study's table
    assert f"W&B: 2 offline run(s) in {folder}" in lines
    assert f"  upload them with: wandb sync {folder}/offline-run-*" in lines
