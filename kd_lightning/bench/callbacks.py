"""Callbacks a study attaches to every run: progress, best-validation snapshot, resumable epochs.

They are added by :func:`kd_lightning.bench.study.run_study` (not by the run's config), so a
config stays a plain LightningCLI config and its digest does not depend on them.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def format_seconds(seconds: float) -> str:
    """``75 -> "1m15s"``, ``4000 -> "1h06m"``, ``nan -> "?"``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StudyProgress(Callback):
    """One status line per epoch of the current run: which run, epoch, val accuracy, ETAs.

    On a terminal the line is rewritten in place (``\\r``); elsewhere (batch jobs, CI logs,
    notebooks) it is printed as a line of its own every ``every_n_epochs`` epochs, so a job's
    log shows progress while a run trains.

    Args:
        prefix: e.g. ``"[3/21] hinton_kd seed=0"``.
        study_eta: seconds of the study left after this run (``nan`` if unknown yet).
        stream: where to write (default ``sys.stdout``).
        every_n_epochs: epoch lines off a terminal (``None``: every epoch; 0: none).
    """

    def __init__(
        self,
        prefix: str,
        study_eta: float = math.nan,
        stream: TextIO | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: no lines), got {every_n_epochs}")
        self.prefix = prefix
        self.study_eta = study_eta
        self.stream = stream or sys.stdout
        self.every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        self._start = time.perf_counter()
        self._first_epoch = 0
        self.lines: list[str] = []

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_epoch = trainer.current_epoch  # > 0 when resumed mid-run

    def status(self, trainer: L.Trainer) -> str:
        done = trainer.current_epoch + 1
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        elapsed = time.perf_counter() - self._start
        per_epoch = elapsed / max(1, done - self._first_epoch)
        run_left = per_epoch * (total - done) if total else math.nan
        accuracy = trainer.callback_metrics.get("val/acc")
        parts = [f"{self.prefix} epoch {done}/{total or '?'}"]
        if accuracy is not None:
            parts.append(f"val acc {float(accuracy):.4f}")
        parts.append(f"run ETA {format_seconds(run_left)}")
        parts.append(f"study ETA {format_seconds(run_left + self.study_eta)}")
        return " | ".join(parts)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        line = self.status(trainer)
        self.lines.append(line)
        if self.interactive:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            print(line, file=self.stream, flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interactive and self.lines:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.interactive and self.lines:
            self.stream.write("\n")
            self.stream.flush()


class BestValSnapshot(Callback):
    """Keep a copy of the student's weights from the epoch with the best validation metric.

    The study evaluates both the last epoch and this snapshot on the test split, so its table
    can report the last-epoch accuracy next to the "best epoch" accuracy that many papers
    report. It also keeps every epoch's value (``history``: the learning curve of the study's
    plot). Snapshot and history are part of the callback's state, so they survive a resume.

    Args:
        monitor: metric to select on (the method's ``monitor``, ``val/acc``).
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.last_value: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []
        """``(epoch, value)`` of every validation (epochs 1-based): the run's learning curve."""

    @property
    def state_key(self) -> str:
        return "kd_lightning.bench.BestValSnapshot"  # subclasses share the checkpointed state

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        self.last_value = value
        self.history.append((trainer.current_epoch + 1, value))
        if self._better(value):  # ties keep the earlier epoch
            self.best_value, self.best_epoch = value, trainer.current_epoch + 1  # 1-based
            student = pl_module.student
            self.best_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}

    def best_student(self, student: torch.nn.Module) -> torch.nn.Module | None:
        """A copy of ``student`` with the best epoch's weights (None if no validation ran)."""
        if self.best_state is None:
            return None
        best = copy.deepcopy(student)
        best.load_state_dict(self.best_state)
        return best

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "last_value": self.last_value,
            "best_state": self.best_state,
            "history": [list(point) for point in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_value = state_dict.get("best_value")
        self.best_epoch = state_dict.get("best_epoch")
        self.last_value = state_dict.get("last_value")
        self.best_state = state_dict.get("best_state")
        self.history = [(int(e), float(v)) for e, v in state_dict.get("history", [])]


class ResumableEpochs(Callback):
    """Write ``last.ckpt`` (atomically) after every ``every_n_epochs`` epochs, so an interrupted
    run resumes from its last finished epoch instead of from scratch.

    Args:
        path: the checkpoint file to (over)write.
        every_n_epochs: how often; 0 disables.
    """

    def __init__(self, path: str | Path, every_n_epochs: int = 1) -> None:
        self.path = Path(path)
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(temporary)
        if trainer.is_global_zero:
            os.replace(temporary, self.path)  # a kill mid-write leaves the previous file intact
