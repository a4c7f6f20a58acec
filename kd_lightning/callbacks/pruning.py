r"""Iterative pruning during training: Optimal Brain Damage and its magnitude baseline.

LeCun, Denker & Solla (1990), "Optimal Brain Damage": train the network, compute the diagonal
of the Hessian of the training loss, delete the parameters of lowest saliency

.. math:: s_k = \tfrac12 \, h_{kk} \, w_k^2 ,

retrain, repeat. :class:`OptimalBrainDamage` runs that loop inside one ``Trainer.fit``: at the
start of scheduled epochs it prunes the student to the next cumulative sparsity of a schedule
(:func:`~kd_lightning.compression.sparsity_schedule`), then training continues with the masks
in place (masked weights stay zero and get zero gradient). The loss whose Hessian is taken is
the module's own objective (``compute_losses(...)["loss"]``: the distillation loss when
retraining distils from a teacher, the cross-entropy for ``Supervised``), on a few batches of
the transfer set. :class:`MagnitudePruning` (Han et al. 2015) is the same schedule with
:math:`s_k = |w_k|`.

Retraining can distil from the unpruned model: start the student from a trained checkpoint
(:class:`~kd_lightning.models.from_checkpoint.FromCheckpoint`) and let the same checkpoint be
the teacher (:class:`~kd_lightning.teachers.PretrainedTeacher`).

Masks are ``torch.nn.utils.prune`` reparametrisations, so the checkpoint holds
``student.<layer>.weight_orig`` and ``student.<layer>.weight_mask``. Lightning restores the
model's weights *before* it calls a callback's ``on_load_checkpoint``, so the callback
installs its masks from a ``load_state_dict`` pre-hook registered in ``setup``: resuming
``fit(ckpt_path=...)`` works, and the optimizer state lines up (the parameter order of every
pruned layer is kept). :func:`kd_lightning.teachers.load_student` rebuilds a pruned student
on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import prune

from kd_lightning.compression.hessian import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
)
from kd_lightning.compression.pruning import (
    _check_sparsity,
    copy_with_masks_applied,
    effective_parameters,
    global_prune_masks,
    magnitude_saliency,
    obd_saliency,
    select_parameters,
    sparsity_of,
    sparsity_schedule,
)
from kd_lightning.models.from_checkpoint import is_from_checkpoint_spec
from kd_lightning.models.spec import model_spec

__all__ = [
    "HESSIAN_METHODS",
    "IterativePruning",
    "MagnitudePruning",
    "OptimalBrainDamage",
    "install_masks",
    "install_pruning_for_state_dict",
    "make_checkpoint_self_contained",
    "student_of",
]

HESSIAN_METHODS = ("auto", "exact", "hutchinson", "obd")
SCHEDULES = ("geometric", "linear", "cubic")
LOSSES = ("objective", "cross_entropy")


# --------------------------------------------------------------------------------------------
# Masks that keep the parameter order (so a resumed optimizer state lines up).
# --------------------------------------------------------------------------------------------


def _reorder_like(sub: nn.Module, order: Sequence[str]) -> None:
    """Put ``<name>_orig`` where ``<name>`` was in ``sub._parameters``.

    ``torch.nn.utils.prune`` deletes ``weight`` and appends ``weight_orig``, so a pruned
    ``Linear`` lists ``bias`` first. An optimizer built on the resumed (already pruned) model
    would then see the parameters in a different order than the one whose state was saved.
    """
    params = sub._parameters
    ordered: dict[str, Any] = {}
    for name in order:
        for candidate in (name, f"{name}_orig"):
            if candidate in params and candidate not in ordered:
                ordered[candidate] = params[candidate]
    for name, value in params.items():
        ordered.setdefault(name, value)
    params.clear()
    params.update(ordered)


def _is_pruned(sub: nn.Module, tensor_name: str) -> bool:
    return hasattr(sub, f"{tensor_name}_mask") and hasattr(sub, f"{tensor_name}_orig")


def install_masks(module: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply boolean masks (``{parameter name: mask}``) in place, keeping the parameter order.

    Like :func:`kd_lightning.compression.apply_masks` (a tensor pruned before keeps its pruned
    entries: the masks multiply), but every pruned layer lists ``<name>_orig`` where
    ``<name>`` was, so ``module.parameters()`` has the same order before and after pruning.
    """
    for name, mask in masks.items():
        path, _, tensor_name = name.rpartition(".")
        sub = module.get_submodule(path) if path else module
        order = list(sub._parameters)
        if _is_pruned(sub, tensor_name):
            current = getattr(sub, f"{tensor_name}_mask")
            if mask.shape != current.shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(current.shape)}."
                )
        elif tensor_name not in sub._parameters:
            raise ValueError(
                f"pruning target names no parameter: {name!r} is not a parameter of the module."
            )
        prune.custom_from_mask(sub, tensor_name, mask.to(getattr(sub, tensor_name).device))
        _reorder_like(sub, order)


def _refresh(sub: nn.Module, tensor_name: str) -> None:
    for hook in sub._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == tensor_name:
            hook(sub, None)


def install_pruning_for_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> list[tuple[nn.Module, str]]:
    """Install an all-ones pruning mask for every ``<name>_mask`` / ``<name>_orig`` key pair.

    Call it on a fresh (unpruned) module before ``load_state_dict`` of a pruned state: the keys
    then match and the loaded masks take effect. Layers already pruned are left alone; the
    parameter order is kept.

    Args:
        module: the module that will load ``state_dict``.
        state_dict: the state to be loaded.
        prefix: prefix of ``module``'s own keys in ``state_dict``.

    Returns:
        ``(submodule, tensor name)`` of every pruned tensor the state dict names.
    """
    targets = []
    for key in state_dict:
        if not key.startswith(prefix) or not key.endswith("_mask"):
            continue
        base = key[len(prefix) : -len("_mask")]
        if f"{prefix}{base}_orig" not in state_dict:
            continue
        path, _, tensor_name = base.rpartition(".")
        try:
            sub = module.get_submodule(path) if path else module
        except AttributeError:
            continue  # not ours: load_state_dict reports the unexpected key itself
        if not _is_pruned(sub, tensor_name):
            if tensor_name not in sub._parameters:
                continue
            order = list(sub._parameters)
            prune.identity(sub, tensor_name)
            _reorder_like(sub, order)
        targets.append((sub, tensor_name))
    return targets


def _register_reload_hooks(pl_module: nn.Module) -> None:
    if getattr(pl_module, "_kd_pruning_reload_hooks", False):
        return
    pending: list[tuple[nn.Module, str]] = []

    def pre_hook(module, state_dict, prefix, *args):
        pending[:] = install_pruning_for_state_dict(module, state_dict, prefix)

    def post_hook(module, incompatible_keys):
        for sub, tensor_name in pending:
            _refresh(sub, tensor_name)  # the masked tensor right now, not at the next forward
        pending.clear()

    pl_module.register_load_state_dict_pre_hook(pre_hook)
    pl_module.register_load_state_dict_post_hook(post_hook)
    pl_module.__dict__["_kd_pruning_reload_hooks"] = True


# --------------------------------------------------------------------------------------------
# Helpers shared with the quantization callback.
# --------------------------------------------------------------------------------------------


def student_of(pl_module: L.LightningModule) -> nn.Module:
    """The module's student (``pl_module.student``), with a clear error when it has none."""
    student = getattr(pl_module, "student", None)
    if not isinstance(student, nn.Module):
        raise ValueError(
            f"{type(pl_module).__name__} has no `student` module to compress; use a "
            "kd_lightning method (OfflineDistillation, Supervised, ...) or give the "
            "LightningModule a `student` attribute."
        )
    return student


def make_checkpoint_self_contained(pl_module: L.LightningModule) -> None:
    """Record the rebuilt student's own spec instead of a ``FromCheckpoint`` spec.

    A student started from another run's checkpoint would otherwise be rebuilt, on reload,
    by reading that other checkpoint again; after this, the compressed run's checkpoint
    rebuilds its student (an ``MLP``, a ``SmallCNN``, ...) from its own weights alone.
    """
    arg = getattr(pl_module, "student_arg", "student")
    hparams = getattr(pl_module, "hparams", None)
    if hparams is None or not is_from_checkpoint_spec(hparams.get(arg)):
        return
    spec = model_spec(student_of(pl_module))
    if spec is not None:
        hparams[arg] = spec


# --------------------------------------------------------------------------------------------
# The schedule.
# --------------------------------------------------------------------------------------------


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
        _register_reload_hooks(pl_module)
        if stage != "fit":
            return
        make_checkpoint_self_contained(pl_module)
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
            self._restore_masks(student_of(pl_module), self._masks_before_round)
            message += " and the last round is undone"
        rank_zero_info(
            f"{message} (sparsity {sparsity_of(student_of(pl_module), self.parameters):.4f})."
        )

    def _restore_masks(self, student: nn.Module, masks: Mapping[str, Tensor]) -> None:
        for name, mask in masks.items():
            path, _, tensor_name = name.rpartition(".")
            sub = student.get_submodule(path) if path else student
            buffer = getattr(sub, f"{tensor_name}_mask")
            buffer.copy_(mask.to(buffer.device, buffer.dtype))
            _refresh(sub, tensor_name)

    def _current_masks(self, student: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
        masks = {}
        for name in names:
            path, _, tensor_name = name.rpartition(".")
            sub = student.get_submodule(path) if path else student
            mask = getattr(sub, f"{tensor_name}_mask", None)
            weight = effective_parameters(student, [name])[name]
            masks[name] = (
                mask.detach().bool().cpu()
                if mask is not None
                else torch.ones(weight.shape, dtype=torch.bool)
            )
        return masks

    def prune_round(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int):
        """Score, rank globally and mask the student to the round's cumulative sparsity."""
        student = student_of(pl_module)
        names = list(select_parameters(student, self.parameters))
        self._masks_before_round = self._current_masks(student, names)
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


# --------------------------------------------------------------------------------------------
# Optimal Brain Damage.
# --------------------------------------------------------------------------------------------


def _sequential_view(model: nn.Module) -> nn.Sequential | None:
    """The model as an ``nn.Sequential`` with the same parameter names, when it is one."""
    if isinstance(model, nn.Sequential):
        return model
    from kd_lightning.models.mlp import MLP

    if type(model) is MLP:  # forward is classifier(hidden(x.flatten(1)))
        layers = [
            ("flatten", nn.Flatten()),
            ("hidden", model.hidden),
            ("classifier", model.classifier),
        ]
        return nn.Sequential(OrderedDict(layers))
    return None


class OptimalBrainDamage(IterativePruning):
    r"""Optimal Brain Damage (LeCun, Denker & Solla 1990) as an iterative pruning schedule.

    Saliency :math:`s_k = \frac12 h_{kk} w_k^2` with :math:`h_{kk}` the diagonal of the Hessian
    of the training loss, averaged over ``hessian_batches`` batches of the transfer set (the
    first batches of the epoch's order), computed with the student in eval mode (no dropout,
    BatchNorm on its running statistics, nothing updated). Negative curvature estimates
    (possible away from a minimum, and from Hutchinson's noise) are clamped to zero, since
    OBD assumes a positive semi-definite Hessian at a minimum.

    Args:
        hessian: ``"exact"`` (double backprop, one batched backward per ``chunk_size``
            entries), ``"hutchinson"`` (unbiased Rademacher estimate with
            ``hutchinson_samples`` probes, for large students), ``"obd"`` (the paper's
            diagonal backward recursion on cross-entropy; ``nn.Sequential`` or ``MLP``
            students of Linear/Conv2d/activations only), or ``"auto"``: exact when the
            selected tensors have at most ``exact_max_elements`` entries, else Hutchinson.
        loss: ``"objective"``: the module's own total loss (``compute_losses(...)["loss"]``,
            with the teacher when it distils); ``"cross_entropy"``: the student's
            cross-entropy on the labeled samples. ``"obd"`` always uses cross-entropy.
        hessian_batches: batches of the training set the loss is averaged over.
        hutchinson_samples: Rademacher probes for ``"hutchinson"``.
        exact_max_elements: threshold of ``"auto"``.
        chunk_size: one-hot vectors (exact) or probes (Hutchinson) per batched backward.
        seed: seed of the Hutchinson probes (round ``r`` uses ``seed + r``).
        target_sparsity, num_rounds, prune_every_n_epochs, start_epoch, schedule,
        parameters, structured, accuracy_floor, monitor, restore_on_floor: see
            :class:`IterativePruning`.
    """

    saliency_name = "obd"

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
        hessian: Literal["auto", "exact", "hutchinson", "obd"] = "auto",
        loss: Literal["objective", "cross_entropy"] = "objective",
        hessian_batches: int = 4,
        hutchinson_samples: int = 64,
        exact_max_elements: int = 50_000,
        chunk_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(
            target_sparsity=target_sparsity,
            num_rounds=num_rounds,
            prune_every_n_epochs=prune_every_n_epochs,
            start_epoch=start_epoch,
            schedule=schedule,
            parameters=parameters,
            structured=structured,
            accuracy_floor=accuracy_floor,
            monitor=monitor,
            restore_on_floor=restore_on_floor,
        )
        if hessian not in HESSIAN_METHODS:
            raise ValueError(f"hessian must be one of {list(HESSIAN_METHODS)}, got {hessian!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}.")
        for name, value in [
            ("hessian_batches", hessian_batches),
            ("hutchinson_samples", hutchinson_samples),
            ("exact_max_elements", exact_max_elements),
            ("chunk_size", chunk_size),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        self.hessian = hessian
        self.loss = loss
        self.hessian_batches = hessian_batches
        self.hutchinson_samples = hutchinson_samples
        self.exact_max_elements = exact_max_elements
        self.chunk_size = chunk_size
        self.seed = seed
        self.last_hessian: dict[str, Tensor] | None = None

    def check_setup(self, trainer, pl_module, student) -> None:
        if self.hessian == "obd" and _sequential_view(student) is None:
            raise ValueError(
                f"hessian='obd' (the paper's recursion) needs an nn.Sequential or MLP student "
                f"of Linear/Conv2d/activation layers; the student is {type(student).__name__}. "
                "Use hessian='exact' or 'hutchinson'."
            )
        if self.loss == "objective" and not hasattr(pl_module, "compute_losses"):
            raise ValueError(
                f"loss='objective' needs a kd_lightning method (compute_losses); "
                f"{type(pl_module).__name__} has none: use loss='cross_entropy'."
            )

    def resolved_method(self, student: nn.Module) -> str:
        """The Hessian method ``"auto"`` picks for this student."""
        if self.hessian != "auto":
            return self.hessian
        total = sum(p.numel() for p in select_parameters(student, self.parameters).values())
        return "exact" if total <= self.exact_max_elements else "hutchinson"

    # ------------------------------------------------------------------ the loss
    def hessian_batches_of(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
        """The first ``hessian_batches`` training batches, on the module's device."""
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            raise ValueError("OptimalBrainDamage needs the training dataloader for the Hessian.")
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        batches = []
        # Iterating a DataLoader draws its base seed from the global generator: keep the
        # training run's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                batches.append(pl_module._apply_batch_transfer_handler(batch))
                if len(batches) == self.hessian_batches:
                    break
        if not batches:
            raise ValueError("the training dataloader is empty: no batch for the Hessian.")
        return batches

    def _loss_of(self, pl_module: L.LightningModule, student: nn.Module, batch: Any) -> Tensor:
        from kd_lightning.methods.base import normalise_batch
        from kd_lightning.teachers import output_logits

        batch = normalise_batch(batch)
        if self.loss == "objective":
            return pl_module.compute_losses(pl_module.forward_models(batch), batch)["loss"]
        logits = output_logits(student(batch["input"]))
        return F.cross_entropy(logits.float(), batch["target"], ignore_index=-1)

    def hessian_diagonal(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batches: list[Any] | None = None,
        round_index: int = 0,
    ) -> dict[str, Tensor]:
        """Diagonal of the Hessian of the loss (mean over ``batches``) w.r.t. the selected tensors.

        Keys are the logical parameter names (``hidden.0.0.weight`` even when pruned; the
        Hessian is then taken w.r.t. ``weight_orig``, whose masked entries get 0).
        """
        student = student_of(pl_module)
        batches = batches if batches is not None else self.hessian_batches_of(trainer, pl_module)
        method = self.resolved_method(student)
        params = select_parameters(student, self.parameters)
        was_training = pl_module.training
        pl_module.eval()  # deterministic loss: no dropout, no BatchNorm statistics update
        try:
            if method == "obd":
                diag = self._obd(student, batches, list(params))
            else:

                def loss_fn() -> Tensor:
                    total = sum(self._loss_of(pl_module, student, b) for b in batches)
                    return total / len(batches)

                if method == "exact":
                    diag = exact_hessian_diagonal(loss_fn, params, chunk_size=self.chunk_size)
                else:
                    generator = torch.Generator().manual_seed(self.seed + round_index)
                    diag = hutchinson_hessian_diagonal(
                        loss_fn,
                        params,
                        self.hutchinson_samples,
                        generator=generator,
                        chunk_size=min(self.chunk_size, 32),
                    )
        finally:
            pl_module.train(was_training)
        self.last_hessian = {n: d.detach() for n, d in diag.items()}
        return self.last_hessian

    def _obd(self, student: nn.Module, batches: list[Any], names: list[str]) -> dict[str, Tensor]:
        from kd_lightning.methods.base import normalise_batch

        view = _sequential_view(copy_with_masks_applied(student).eval())
        total: dict[str, Tensor] = {}
        count = 0
        for batch in batches:
            batch = normalise_batch(batch)
            labeled = batch["target"] >= 0
            if not labeled.any():
                continue
            diag = obd_hessian_diagonal(
                view, batch["input"][labeled], batch["target"][labeled], loss="cross_entropy"
            )
            for name in names:
                total[name] = total.get(name, 0) + diag[name]
            count += 1
        if count == 0:
            raise ValueError("hessian='obd' needs labeled samples; the Hessian batches have none.")
        return {name: value / count for name, value in total.items()}

    def saliencies(self, trainer, pl_module, student) -> dict[str, Tensor]:
        diag = self.hessian_diagonal(trainer, pl_module, round_index=self.rounds_done)
        weights = effective_parameters(student, self.parameters)
        return {name: obd_saliency(weights[name], diag[name]) for name in weights}
