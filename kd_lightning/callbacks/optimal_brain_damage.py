r"""Optimal Brain Damage as an iterative pruning schedule inside ``Trainer.fit``.

LeCun, Denker & Solla (1990), "Optimal Brain Damage": train the network, compute the diagonal
of the Hessian of the training loss, delete the parameters of lowest saliency

.. math:: s_k = \tfrac12 \, h_{kk} \, w_k^2 ,

retrain, repeat. The schedule is :class:`~kd_lightning.callbacks.IterativePruning`'s. The loss
whose Hessian is taken is the module's own objective (``compute_losses(...)["loss"]``: the
distillation loss when retraining distils from a teacher, the cross-entropy for
``Supervised``), on a few batches of the transfer set. The Hessian itself is computed by
:mod:`kd_lightning.compression.hessian`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.callbacks.pruning import IterativePruning
from kd_lightning.callbacks.student import student_of
from kd_lightning.compression.hessian import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
    sequential_view,
)
from kd_lightning.compression.pruning import (
    copy_with_masks_applied,
    effective_parameters,
    obd_saliency,
    select_parameters,
)
from kd_lightning.data.batch import normalise_batch
from kd_lightning.modes import eval_mode
from kd_lightning.teachers import output_logits

__all__ = ["HESSIAN_METHODS", "OptimalBrainDamage"]

HESSIAN_METHODS = ("auto", "exact", "hutchinson", "obd")
LOSSES = ("objective", "cross_entropy")


def _transfer(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> Any:
    """What Lightning does to a training batch before ``training_step``, by its public hooks.

    Each of the three batch hooks is the data module's where the data module overrides it,
    else the LightningModule's (Lightning's own rule).
    """
    datamodule = trainer.datamodule

    def owner(hook: str) -> Any:
        if datamodule is not None and getattr(type(datamodule), hook) is not getattr(
            L.LightningDataModule, hook
        ):
            return datamodule
        return pl_module

    batch = owner("on_before_batch_transfer").on_before_batch_transfer(batch, 0)
    batch = owner("transfer_batch_to_device").transfer_batch_to_device(batch, pl_module.device, 0)
    return owner("on_after_batch_transfer").on_after_batch_transfer(batch, 0)


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
        if self.hessian == "obd" and sequential_view(student) is None:
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
                batches.append(_transfer(trainer, pl_module, batch))
                if len(batches) == self.hessian_batches:
                    break
        if not batches:
            raise ValueError("the training dataloader is empty: no batch for the Hessian.")
        return batches

    def _loss_of(self, pl_module: L.LightningModule, student: nn.Module, batch: Any) -> Tensor:
        batch = normalise_batch(batch)
        if self.loss == "objective":
            knowledge = pl_module.forward_knowledge(batch, "train")
            return pl_module.compute_losses(knowledge, batch, "train")["loss"]
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
        # Deterministic loss (no dropout, no BatchNorm statistics update); afterwards every
        # submodule's own mode, so a backbone the user froze in eval mode stays frozen.
        with eval_mode(pl_module):
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
        self.last_hessian = {n: d.detach() for n, d in diag.items()}
        return self.last_hessian

    def _obd(self, student: nn.Module, batches: list[Any], names: list[str]) -> dict[str, Tensor]:
        view = sequential_view(copy_with_masks_applied(student).eval())
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
