"""Stop a run at its first non-finite loss, naming the term and the likely cause.

The check must not add a host sync to every step on an accelerator: each step records
``~isfinite`` of every term into a device flag (no sync); the flag is read every step on the CPU,
every ``log_every_n_steps`` steps on an accelerator, at every epoch end and before every
checkpoint is written. An update can also break the weights while the loss that produced it was
still finite (float16 without the range for Adam's epsilon): before every checkpoint the
trained parameters are checked too, so no checkpoint of non-finite weights is ever saved.
The label guard (:class:`~kd_lightning.data.batch.TargetGuard`) is read at the same points.

Validation and test losses are recorded the same way into their own flags and read once, at the
end of each evaluation (and before any checkpoint): a NaN that only the validation inputs carry
stops the run instead of logging ``val/loss nan`` and exiting 0. A term whose unweighted value is
finite but whose weighted value ``weight * value`` overflows (a weight of 1e39 in float32) is
named as that term, with its weight, not only as the total ``loss``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

EVAL_CAUSES = (
    "likely causes: a NaN/inf in the {split} inputs or labels only (the training loss was "
    "finite: check the {split} split of the data), or weights that a finite training loss "
    "still broke"
)

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
        self.weights: dict[str, float] = {}
        self.evaluation: dict[str, tuple[list[str], torch.Tensor]] = {}

    def record(
        self, losses: dict[str, torch.Tensor], stage: str = "train", module: Any = None
    ) -> None:
        """Record which of ``losses`` are non-finite (device ops only, no host sync).

        Args:
            losses: ``{"loss": total, <term>: unweighted value}``.
            stage: ``train``, ``val`` or ``test`` (evaluation flags are read at its end).
            module: the method; its objective's weights at this step name a term whose
                *weighted* value overflowed.
        """
        names = list(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        factors = _factors(module)
        if factors:
            self.weights = factors
        # Unweighted values, then the products Objective sums (a finite loss x 1e39 is inf);
        # Python-scalar products: no host-to-device copy, so no sync on an accelerator.
        weighted = torch.stack(
            [v * factors.get(n, 1.0) for n, v in zip(names, values, strict=True)]
        )
        bad = torch.cat([~torch.isfinite(values), ~torch.isfinite(weighted)])
        if stage != "train":
            known = self.evaluation.get(stage)
            if known is None or known[0] != names or known[1].device != bad.device:
                known = (names, torch.zeros_like(bad))
                self.evaluation[stage] = known
            known[1].__ior__(bad)
            return
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

    def _terms(self, names: list[str], flags: torch.Tensor) -> tuple[str, bool]:
        """The terms that went non-finite, and those whose weighted value overflowed; True
        when only weights overflowed (the cause is then named, not guessed)."""
        raw, weighted = flags[: len(names)].tolist(), flags[len(names) :].tolist()
        bad = [n for n, f in zip(names, raw, strict=True) if f and n != "loss"]
        over = [
            n for n, f, w in zip(names, raw, weighted, strict=True) if w and not f and n != "loss"
        ]
        if not bad and not over:
            return f"{['loss']} (each term's weighted value is finite: their sum overflowed)", False
        note = "".join(
            f"; term {n!r} is finite but weight x value overflows the float range (weight "
            f"{self.weights.get(n, 1.0):g}): give it a smaller weight"
            for n in over
        )
        return f"{bad + over}{note}", not bad

    def raise_if_evaluation_tripped(self) -> None:
        """Refuse a non-finite validation or test loss (read once per evaluation)."""
        for stage, (names, flags) in self.evaluation.items():
            if bool(flags.any()):
                split = {"val": "validation"}.get(stage, stage)
                terms, weights_only = self._terms(names, flags)
                causes = "" if weights_only else " " + EVAL_CAUSES.format(split=split)
                raise NonFiniteTraining(
                    f"the {split} loss became non-finite in term(s) {terms}; the run stops and "
                    f"no checkpoint is written.{causes}"
                )

    def raise_if_tripped(self, step: int | None = None) -> None:
        for guard in self.also:  # bad labels are the likelier cause of what follows
            guard.raise_if_tripped()
        if self.flags is not None and bool(self.flags.any()):
            where = f" by step {step}" if step is not None else ""
            terms, weights_only = self._terms(self.names, self.flags)
            raise NonFiniteTraining(
                f"the training loss became non-finite{where} in term(s) {terms}; the run stops "
                "and no checkpoint of these weights is written."
                + ("" if weights_only else f" {CAUSES}")
            )
        self.raise_if_evaluation_tripped()


def _factors(module: Any) -> dict[str, float]:
    """``{term name: weight x schedule}`` of ``module``'s objective at its current progress."""
    objective = getattr(module, "objective", None)
    if objective is None:
        return {}
    progress = module.progress
    return {term.name: float(term.factor(progress)) for term in objective}
