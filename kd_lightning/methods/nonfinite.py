"""Stop a run at its first non-finite loss, naming the term and the likely cause.

The check must not add a host sync to every step on an accelerator: each step records
``~isfinite`` of every term into a device flag (no sync); the flag is read every step on the CPU,
every ``log_every_n_steps`` steps on an accelerator, at every epoch end and before every
checkpoint is written. An update can also break the weights while the loss that produced it was
still finite (float16 without the range for Adam's epsilon): before every checkpoint the
trained parameters are checked too, so no checkpoint of non-finite weights is ever saved.
The label guard (:class:`~kd_lightning.data.batch.TargetGuard`) is read at the same points.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

CAUSES = (
    "likely causes: a NaN/inf in the inputs, a loss weight or temperature of nan/inf, a "
    "learning rate that is too high, or float16 precision on hardware without it (use "
    "precision: bf16-mixed or 32)"
)


class NonFiniteTraining(RuntimeError):
    """Raised when a training loss term is NaN or infinite."""


class NonFiniteGuard:
    """Device-side record of which loss terms went non-finite (see the module docstring)."""

    def __init__(self, also: Iterable[Any] = ()) -> None:
        # Other device-side guards (the label guard) read at the same points: one schedule.
        self.also = tuple(also)
        self.names: list[str] = []
        self.flags: torch.Tensor | None = None
        self.first_step: torch.Tensor | None = None

    def record(self, losses: dict[str, torch.Tensor]) -> None:
        names = list(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        bad = ~torch.isfinite(values)
        if self.flags is None or names != self.names or self.flags.device != bad.device:
            self.names, self.flags = names, torch.zeros_like(bad)
        self.flags |= bad

    def maybe_raise(self, module: Any) -> None:
        if self.flags is None and all(getattr(g, "tripped", None) is None for g in self.also):
            return
        every = max(1, int(getattr(module.trainer, "log_every_n_steps", 1) or 1))
        on_cpu = self.flags is not None and self.flags.device.type == "cpu"
        if on_cpu or module.global_step % every == 0:
            self.raise_if_tripped(module.global_step)

    def check_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refuse non-finite trained weights (called before a checkpoint is written)."""
        named = [(n, p) for n, p in named_parameters if p.is_floating_point()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
        if bool(finite.all()):  # one host sync per checkpoint
            return
        bad = [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        raise NonFiniteTraining(
            f"the weights became non-finite ({bad[:3]}{' ...' if len(bad) > 3 else ''}) after "
            "an update whose loss was still finite; the run stops and no checkpoint of these "
            f"weights is written. {CAUSES}"
        )

    def raise_if_tripped(self, step: int | None = None) -> None:
        for guard in self.also:  # bad labels are the likelier cause of what follows
            guard.raise_if_tripped()
        if self.flags is None or not bool(self.flags.any()):
            return
        bad = [n for n, f in zip(self.names, self.flags.tolist(), strict=True) if f]
        terms = [n for n in bad if n != "loss"] or bad
        where = f" by step {step}" if step is not None else ""
        raise NonFiniteTraining(
            f"the training loss became non-finite{where} in term(s) {terms}; the run stops "
            f"and no checkpoint of these weights is written. {CAUSES}"
        )
