r"""Iterative pruning during training: the schedule, and its magnitude baseline.

:class:`IterativePruning` runs the loop train -> prune -> retrain inside one ``Trainer.fit``:
at the start of scheduled epochs it prunes the student to the next cumulative sparsity of a
schedule (:func:`~kd_lightning.compression.sparsity_schedule`), then training continues with
the masks in place (masked weights stay zero and get zero gradient). The saliency is the
subclass's: :class:`MagnitudePruning` (Han et al. 2015) ranks by :math:`|w_k|`;
:class:`~kd_lightning.callbacks.OptimalBrainDamage` (LeCun, Denker & Solla 1990) by
:math:`\tfrac12 h_{kk} w_k^2`.

Retraining can distil from the unpruned model: start the student from a trained checkpoint
(:class:`~kd_lightning.models.from_checkpoint.FromCheckpoint`) and let the same checkpoint be
the teacher (:class:`~kd_lightning.teachers.PretrainedTeacher`).

Masks are ``torch.nn.utils.prune`` reparametrisations (:mod:`kd_lightning.compression.masks`),
so the checkpoint holds ``student.<layer>.weight_orig`` and ``student.<layer>.weight_mask``.
Lightning restores the model's weights *before* it calls a callback's ``on_load_checkpoint``,
so the callback installs its masks from a ``load_state_dict`` pre-hook registered in
``setup``: resuming ``fit(ckpt_path=...)`` works, and the optimizer state lines up (the
parameter order of every pruned layer is kept). Loaders rebuild a pruned student on their own
(:func:`kd_lightning.compression.prepare_for_state_dict`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from kd_lightning.callbacks.student import student_of
from kd_lightning.compression.masks import (
    current_masks,
    install_masks,
    install_pruning_for_state_dict,
    register_pruning_reload_hooks,
    restore_masks,
)
from kd_lightning.compression.pruning import (
    _check_sparsity,
    effective_parameters,
    global_prune_masks,
    magnitude_saliency,
    select_parameters,
    sparsity_of,
    sparsity_schedule,
)

__all__ = [
    "IterativePruning",
    "MagnitudePruning",
    "install_masks",
    "install_pruning_for_state_dict",
    "student_of",
]

SCHEDULES = ("geometric", "linear", "cubic")


class IterativePruning(Callback):
    """Iterative global pruning of the student: prune -> retrain -> prune ... -> target.

    Round ``r`` (``0 <= r < num_rounds``) runs at the start of training epoch
    ``start_epoch + r * prune_every_n_epochs`` and prunes the selected tensors, all together
    (layers compete for the budget), to the ``r``-th value of a cumulative sparsity schedule
    ending at ``target_sparsity``. Already pruned entries stay pruned. The epochs after a
    round retrain the surviving weights with the module's own objective. Subclasses define
    the saliency (:meth:`saliencies`).

    Metrics logged each epoch: ``prune/sparsity`` (fraction of zero entries in the selected
    tensors) and ``prune/round`` (rounds done).

    Args:
        target_sparsity: final fraction of pruned entries of the selected tensors, in [0, 1).
        num_rounds: pruning rounds (>= 1).
        prune_every_n_epochs: epochs of retraining between two rounds (>= 1).
        start_epoch: epoch of the first round; 0 prunes a trained student (e.g. a
            ``FromCheckpoint`` student) at once, ``k`` trains ``k`` epochs first.
        schedule: ``"geometric"`` (each round removes the same fraction of the survivors),
            ``"linear"`` or ``"cubic"`` (Zhu & Gupta 2017).
        parameters: glob patterns of the student's parameters to prune, e.g.
            ``["hidden.*.weight"]``; default: every Linear/Conv weight.
        structured: prune whole output channels (rows of a Linear weight, filters of a
            convolution) ranked by the summed saliency of their entries.
        accuracy_floor: stop pruning once ``monitor`` (measured after a round's retraining)
            falls below this value; the round that caused it is undone when
            ``restore_on_floor``.
        monitor: the metric compared with ``accuracy_floor``.
        restore_on_floor: undo the last round when the floor is crossed.
    """

    saliency_name: ClassVar[str] = "saliency"

    def __init__(
        self,
        target_sparsity: float = 0.9,
        num_rounds: int = 3,
        prune_every_n_epochs: int = 1,
        start_epoch: int = 0,
        schedule: Literal["geometric", "linear", "cubic"] = "geometric",
        parameters: list[str] | None = None,
        structured: bool = False,
        accuracy_floor: float | None = None,
        monitor: str = "val/acc",
        restore_on_floor: bool = True,
    ) -> None:
        super().__init__()
        _check_sparsity(target_sparsity)
        for name, value, low in [
            ("num_rounds", num_rounds, 1),
            ("prune_every_n_epochs", prune_every_n_epochs, 1),
            ("start_epoch", start_epoch, 0),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}.")
        if isinstance(parameters, str):
            parameters = [parameters]
        self.target_sparsity = float(target_sparsity)
        self.num_rounds = num_rounds
        self.prune_every_n_epochs = prune_every_n_epochs
        self.start_epoch = start_epoch
        self.schedule = schedule
        self.parameters = list(parameters) if parameters is not None else None
        self.structured = structured
        self.accuracy_floor = accuracy_floor
        self.monitor = monitor
        self.restore_on_floor = restore_on_floor
        self.sparsities = sparsity_schedule(self.target_sparsity, num_rounds, schedule)
        # Checkpointed state (see state_dict): rounds done, stopped by the floor, history.
        self.rounds_done = 0
        self.stopped = False
        self.history: list[dict[str, Any]] = []
        self._masks_before_round: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ schedule
    @property
    def round_epochs(self) -> list[int]:
        """The epoch at whose start each round runs."""
        return [self.start_epoch + r * self.prune_every_n_epochs for r in range(self.num_rounds)]

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.target_sparsity}, {self.parameters}]"

    # ------------------------------------------------------------------ start-up checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        student = student_of(pl_module)
        # Raises "pruning target names no parameter" with the valid names, before any step.
        select_parameters(student, self.parameters)
        register_pruning_reload_hooks(pl_module)
        if stage != "fit":
            return
        last = self.round_epochs[-1]
        max_epochs = trainer.max_epochs
        if not trainer.fast_dev_run and max_epochs is not None and 0 <= max_epochs <= last:
            raise ValueError(
                f"{type(self).__name__}: the last of {self.num_rounds} pruning rounds runs at the "
                f"start of epoch {last} but trainer.max_epochs={max_epochs}; set max_epochs > "
                f"{last} (better: leave epochs to retrain after it) or fewer rounds / a smaller "
                "prune_every_n_epochs / start_epoch."
            )
        self.check_setup(trainer, pl_module, student)

    def check_setup(self, trainer: L.Trainer, pl_module: L.LightningModule, student) -> None:
        """Start-up checks of a saliency strategy."""

    # ------------------------------------------------------------------ the loop
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        epochs = self.round_epochs
        if not self.stopped and epoch in epochs and epochs.index(epoch) >= self.rounds_done:
            round_index = epochs.index(epoch)
            if round_index > 0 and self.accuracy_floor is not None:
                self._check_floor(trainer, pl_module)
            if not self.stopped:
                self.prune_round(trainer, pl_module, round_index)
        student = student_of(pl_module)
        pl_module.log(
            "prune/sparsity", sparsity_of(student, self.parameters), on_step=False, on_epoch=True
        )
        pl_module.log("prune/round", float(self.rounds_done), on_step=False, on_epoch=True)

    def _check_floor(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"accuracy_floor needs the metric {self.monitor!r}, which was not logged; "
                f"logged metrics are {sorted(trainer.callback_metrics)}. Enable validation or "
                "set `monitor`."
            )
        value = float(value)
        if self.history:
            self.history[-1][self.monitor] = value
        if value >= self.accuracy_floor:
            return
        self.stopped = True
        message = (
            f"{type(self).__name__}: {self.monitor}={value:.4f} < accuracy_floor="
            f"{self.accuracy_floor}; pruning stops"
        )
        if self.restore_on_floor and self._masks_before_round is not None:
            restore_masks(student_of(pl_module), self._masks_before_round)
            message += " and the last round is undone"
        rank_zero_info(
            f"{message} (sparsity {sparsity_of(student_of(pl_module), self.parameters):.4f})."
        )

    def prune_round(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int):
        """Score, rank globally and mask the student to the round's cumulative sparsity."""
        student = student_of(pl_module)
        names = list(select_parameters(student, self.parameters))
        self._masks_before_round = current_masks(student, names)
        scores = self.saliencies(trainer, pl_module, student)
        weights = effective_parameters(student, self.parameters)
        ranked = {}
        for name in names:
            score = scores[name].detach().float().clamp_min(0.0)
            # Already-pruned entries rank below every live one, so they stay pruned and the
            # cumulative target counts them (a live weight's saliency can be exactly 0).
            ranked[name] = torch.where(weights[name] == 0, torch.full_like(score, -1.0), score)
        sparsity = self.sparsities[round_index]
        masks = global_prune_masks(ranked, sparsity, structured=self.structured)
        install_masks(student, masks)
        collapsed = [name for name, mask in masks.items() if not mask.any()]
        if collapsed:
            rank_zero_warn(
                f"{type(self).__name__}: every entry of {collapsed} is pruned (layer collapse: "
                "global ranking removed the whole tensor). Prune a trained network "
                "(start_epoch > 0 or a FromCheckpoint student), lower target_sparsity, or "
                "leave that tensor out of `parameters`."
            )
        self.rounds_done = round_index + 1
        reached = sparsity_of(student, self.parameters)
        self.history.append(
            {
                "round": round_index,
                "epoch": trainer.current_epoch,
                "target": sparsity,
                "sparsity": reached,
            }
        )
        rank_zero_info(
            f"{type(self).__name__}: round {round_index + 1}/{self.num_rounds} at epoch "
            f"{trainer.current_epoch}: sparsity {reached:.4f} (target {sparsity:.4f})."
        )
        return masks

    def saliencies(
        self, trainer: L.Trainer, pl_module: L.LightningModule, student: nn.Module
    ) -> dict[str, Tensor]:
        """``{parameter name: saliency}`` of the selected tensors (higher = keep)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds_done": self.rounds_done,
            "stopped": self.stopped,
            "history": list(self.history),
            "masks_before_round": self._masks_before_round,
            "sparsities": list(self.sparsities),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_done = int(state_dict.get("rounds_done", 0))
        self.stopped = bool(state_dict.get("stopped", False))
        self.history = list(state_dict.get("history", []))
        self._masks_before_round = state_dict.get("masks_before_round")


class MagnitudePruning(IterativePruning):
    """Magnitude pruning (Han et al. 2015): the schedule of :class:`IterativePruning` with
    saliency :math:`|w_k|`; the baseline OBD is compared with.

    Args: see :class:`IterativePruning`.
    """

    saliency_name = "magnitude"

    def saliencies(self, trainer, pl_module, student) -> dict[str, Tensor]:
        return {
            n: magnitude_saliency(w)
            for n, w in effective_parameters(student, self.parameters).items()
        }
