"""Schedules: how a loss term's weight follows the training progress.

A :class:`~kd_lightning.objective.LossTerm` multiplies its weight by ``schedule(progress)``.
Losses that need the progress themselves (PS-KD's ``alpha_t``, an annealed temperature) accept a
``progress`` keyword in ``forward`` and receive the same :class:`Progress`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_lightning.models.spec import records_init_args


@dataclass(frozen=True)
class Progress:
    """Where training stands when a term is evaluated.

    Attributes:
        epoch: current epoch (0-based).
        step: optimizer steps taken so far (``trainer.global_step``).
        max_epochs: the run's planned epochs (``None`` when unknown, e.g. step-based runs).
    """

    epoch: int = 0
    step: int = 0
    max_epochs: int | None = None

    @property
    def fraction(self) -> float:
        """``epoch / max_epochs`` in [0, 1] (0 when ``max_epochs`` is unknown)."""
        if not self.max_epochs:
            return 0.0
        return min(1.0, self.epoch / self.max_epochs)


class Schedule:
    """A weight factor as a function of :class:`Progress` (base: always 1)."""

    def __call__(self, progress: Progress) -> float:
        return 1.0

    def active(self, progress: Progress) -> bool:
        """Whether the term trains at all at ``progress`` (see :class:`StartAt`)."""
        return True

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@records_init_args
class Constant(Schedule):
    """Factor 1 at every epoch."""


@records_init_args
class LinearWarmup(Schedule):
    """Factor ``min(1, (epoch + 1) / epochs)``: DKD's 20-epoch warm-up (Zhao et al. 2022).

    Args:
        epochs: length of the ramp; 0 disables it.
    """

    def __init__(self, epochs: int) -> None:
        if int(epochs) != epochs or epochs < 0:
            raise ValueError(f"warm-up epochs must be an integer >= 0, got {epochs!r}")
        self.epochs = int(epochs)

    def __call__(self, progress: Progress) -> float:
        if self.epochs == 0:
            return 1.0
        return min(1.0, (progress.epoch + 1) / self.epochs)


@records_init_args
class StartAt(Schedule):
    """Factor 0 before ``epoch``, 1 from it on: the second stage of a staged objective.

    FitNets (Romero et al. 2015) trains the hint alone for a first stage; the terms of the full
    objective then carry ``StartAt(epoch=<stage-1 length>)``. A term that is not active is not
    evaluated at all (no compute, no gradient).

    Args:
        epoch: first epoch (0-based) in which the term trains.
    """

    def __init__(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"StartAt epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __call__(self, progress: Progress) -> float:
        return 1.0 if progress.epoch >= self.epoch else 0.0

    def active(self, progress: Progress) -> bool:
        return progress.epoch >= self.epoch


@records_init_args
class LinearRamp(Schedule):
    """Factor ``start + (end - start) * epoch / max_epochs``: a linear change over the run.

    PS-KD's ``alpha_t = alpha_T * t / T`` (Kim et al. 2021) is ``LinearRamp(0, alpha_T)``.

    Args:
        start: factor at epoch 0.
        end: factor at ``max_epochs``.
    """

    def __init__(self, start: float = 0.0, end: float = 1.0) -> None:
        self.start, self.end = float(start), float(end)

    def __call__(self, progress: Progress) -> float:
        return self.start + (self.end - self.start) * progress.fraction
