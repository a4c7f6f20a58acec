"""What ``kd-lightning fit`` prints while and after it trains.

* :class:`EpochLines`: a progress bar for logs. Off a terminal (batch jobs, CI logs, ``| tee``)
  Lightning's TQDM bar writes hundreds of carriage-return frames per epoch; this bar writes one
  line per epoch instead, with the values the bar would show (``train/loss``, ``val/acc``, ...).
* :class:`FitSummary`: when fit ends, one line with the monitored metric (last and best epoch),
  then where the run's files are: ``best.ckpt``, ``last.ckpt``, ``config.yaml`` and, with the
  W&B logger, the run's folder and the ``wandb sync`` command of an offline run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # a string or a nested dict in the bar: not an epoch value
        return None


def epoch_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The epoch values among a progress bar's metrics: ``<key>_step`` dropped, ``<key>_epoch``
    shown as ``<key>``; train values before validation values."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith("_step") or key == "v_num":
            continue
        number = _number(value)
        if number is not None:
            values[key.removesuffix("_epoch")] = number
    return dict(sorted(values.items(), key=lambda item: (not item[0].startswith("train"), item[0])))


class EpochLines(ProgressBar):
    """One line per training epoch, for output that is not a terminal.

    ``epoch 3/30 | train/acc 0.9123 | train/loss 0.4120 | val/acc 0.9620 | val/loss 0.1875 | 1.2s``

    Args:
        stream: where to write (default ``sys.stdout``).
        every_n_epochs: a line every this many epochs (the last epoch always gets one).
    """

    def __init__(self, stream: TextIO | None = None, every_n_epochs: int = 1) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.stream = stream
        self.every_n_epochs = every_n_epochs
        self._enabled = True
        self._epoch_start = time.perf_counter()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float) -> str:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        parts = [f"epoch {trainer.current_epoch + 1}/{total}"]
        for key, value in epoch_values(self.get_metrics(trainer, pl_module)).items():
            parts.append(f"{key} {value:.4f}")
        parts.append(f"{seconds:.1f}s")
        return " | ".join(parts)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        line = self.line(trainer, pl_module, time.perf_counter() - self._epoch_start)
        print(line, file=self.stream or sys.stdout, flush=True)


def _wandb_lines(trainer: L.Trainer) -> list[str]:
    """Where each W&B logger's run is, and how an offline run is uploaded."""
    lines = []
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        run = logger.experiment
        folder = getattr(run, "dir", None)
        if not folder:  # a disabled run, or another rank's placeholder
            continue
        run_folder = Path(folder).parent  # <save_dir>/wandb/offline-run-<time>-<id>/files
        if getattr(run, "offline", False):
            lines.append(f"W&B offline run: {run_folder}")
            lines.append(f"  upload it with: wandb sync {run_folder}")
        else:
            lines.append(f"W&B run: {getattr(run, 'url', None) or run_folder}")
    return lines


class FitSummary(Callback):
    """When fit ends (or stops), print the monitored metric and where the run's files are.

    ``fit done: val/acc 0.9620 at epoch 30 (best 0.9700 at epoch 12)``, then one line per file:
    each :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s best and last checkpoint, the
    saved ``config.yaml`` (``config_path`` of a callback that has one) and the W&B run.

    Args:
        monitor: the metric to report (a method's ``monitor`` class attribute).
        mode: ``"max"`` or ``"min"`` (the method's ``mode``).
        stream: where to write (default ``sys.stdout``).
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", stream: TextIO | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode, self.stream = monitor, mode, stream
        self.history: list[tuple[int, float]] = []
        """``(epoch, value)`` of every validation, epochs 1-based."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.history.append((trainer.current_epoch + 1, float(value)))

    def best(self) -> tuple[int, float] | None:
        """``(epoch, value)`` of the best validation; ties keep the earlier epoch."""
        if not self.history:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(self.history, key=lambda point: (sign * point[1], -point[0]))

    def metric_line(self, trainer: L.Trainer, verb: str = "done") -> str:
        if not self.history:
            return f"fit {verb} after {trainer.current_epoch} epoch(s): no {self.monitor} logged"
        epoch, value = self.history[-1]
        best_epoch, best_value = self.best()
        return (
            f"fit {verb}: {self.monitor} {value:.4f} at epoch {epoch} "
            f"(best {best_value:.4f} at epoch {best_epoch})"
        )

    def file_lines(self, trainer: L.Trainer) -> list[str]:
        paths: list[str] = []
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                paths += [callback.best_model_path, callback.last_model_path]
        paths += [str(c.config_path) for c in trainer.callbacks if getattr(c, "config_path", None)]
        shown = [p for p in dict.fromkeys(paths) if p and Path(p).is_file()]
        return [f"  {Path(p).name} -> {p}" for p in shown] + _wandb_lines(trainer)

    def _report(self, trainer: L.Trainer, verb: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        lines = [self.metric_line(trainer, verb), *self.file_lines(trainer)]
        print("\n".join(lines), file=self.stream or sys.stdout, flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "done")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Ctrl-C: say where last.ckpt is (to resume). Any other error prints its own sentence
        # first and alone (kd_lightning.cli_errors), so nothing is added before it.
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            self._report(trainer, "stopped by Ctrl-C")
