"""A weighted term of a distillation objective: which loss, on which knowledge, with what weight.

Every method's objective is a list of :class:`LossTerm` over the step's *knowledge*: a flat dict
of the models' outputs (``student``, ``teacher``, ``ema``, ``peer0``, ``exit1``, ...) and hooked
layers (``student.layer2``). :class:`Objective` evaluates the list once per step.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kd_lightning.models.spec import records_init_args
from kd_lightning.objective.schedule import LinearWarmup, Progress, Schedule, StartAt

_FLOAT32_TINY = torch.finfo(torch.float32).tiny

LOGITS = "logits"
"""Source name of the side's own output logits (``student`` or ``teacher``)."""
TOPK = "topk"
"""Source name of a cached teacher's sparse top-k knowledge (``teacher.topk``)."""


def _snake_name(loss: nn.Module) -> str:
    name = type(loss).__name__.removesuffix("Loss") or type(loss).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resolve_source(source: str, side: str, models: Iterable[str]) -> str:
    """The knowledge key a term's source names.

    ``"logits"`` is the side's own model (``student``/``teacher``); a model name (``ema``,
    ``peer1``) is that model's logits; ``"<model>.<layer>"`` is a hooked layer; anything else is a
    layer path of the side's model (``stage2`` on the student side is ``student.stage2``).
    """
    models = set(models)
    if source == LOGITS:
        return side
    if source in models:
        return source
    head, _, rest = source.partition(".")
    if rest and head in models:
        return source
    return f"{side}.{source}"


def split_key(key: str, models: Iterable[str]) -> tuple[str, str | None]:
    """``"student.layer1.0"`` -> ``("student", "layer1.0")``; ``"teacher"`` -> ``("teacher", None)``."""
    if key in set(models):
        return key, None
    head, _, rest = key.partition(".")
    return head, rest or None


@records_init_args
class LossTerm(nn.Module):
    """One term ``weight * schedule(progress) * loss(student=..., teacher=..., target=...)``.

    Args:
        loss: any module with the ``forward(*, student, teacher, target=None)`` contract (every
            loss of :mod:`kd_lightning.losses`, or your own). If its ``forward`` also accepts
            ``index``, ``mask`` (the batch's attention mask) or ``progress``
            (:class:`~kd_lightning.objective.Progress`), it receives them.
        weight: the term's weight in the total loss (finite, >= 0).
        name: name of the term in logs (``train/loss_<name>``); default: from the loss class.
        student: the knowledge the loss sees as ``student``: ``"logits"`` (the student's
            output), a model name of the method (``peer1``, ``exit0``, ``ema``), a hooked layer
            path (``stage2`` or ``student.stage2``), or a list of them for losses over layer pairs.
        teacher: the same for ``teacher`` (``"logits"`` is the teacher's output, ``"topk"`` a
            cached teacher's sparse top-k).
        connector: module applied to the student's knowledge before the loss (reconciles
            shapes); trained with the student.
        schedule: weight factor over training (:mod:`kd_lightning.objective.schedule`).
        warmup_epochs: shorthand for ``schedule=LinearWarmup(warmup_epochs)`` (DKD uses 20).
        pretrain_epochs: a first stage of this many epochs in which only the terms with
            ``pretrain_epochs`` train (FitNets stage 1: the hint trains the student's lower
            layers); the other terms start after it. 0: no such stage.

    Raises:
        ValueError: a negative or non-finite weight, or both ``schedule`` and ``warmup_epochs``.
    """

    def __init__(
        self,
        loss: nn.Module,
        weight: float = 1.0,
        name: str | None = None,
        student: str | list[str] = LOGITS,
        teacher: str | list[str] = LOGITS,
        connector: nn.Module | None = None,
        schedule: Schedule | None = None,
        warmup_epochs: int = 0,
        pretrain_epochs: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise TypeError(f"weight of a loss term must be a number, got {weight!r}")
        term = name or _snake_name(loss)
        if not math.isfinite(weight):
            raise ValueError(
                f"weight of a loss term must be >= 0 and finite, got {weight} (term {term!r}): "
                "a nan/inf weight makes every loss non-finite; give a number >= 0"
            )
        if weight < 0:
            raise ValueError(
                f"weight of a loss term must be >= 0, got {weight} (term {term!r}); give a "
                "finite number >= 0"
            )
        if 0 < weight < _FLOAT32_TINY:
            raise ValueError(
                f"weight of a loss term is {weight} (term {term!r}): below {_FLOAT32_TINY:.3g}, "
                "the smallest normal float32, so the weighted loss rounds to 0 and the term "
                "trains nothing; give 0 to switch it off, or a weight >= 1e-30"
            )
        if warmup_epochs and schedule is not None:
            raise ValueError("give either schedule or warmup_epochs, not both")
        if int(pretrain_epochs) != pretrain_epochs or pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {pretrain_epochs!r}")
        self.loss = loss
        self.weight = float(weight)
        self.name = name or _snake_name(loss)
        self.student_source = student
        self.teacher_source = teacher
        self.connector = connector
        self.schedule = schedule if schedule is not None else LinearWarmup(warmup_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.pretrain_epochs = int(pretrain_epochs)
        parameters = inspect.signature(loss.forward).parameters
        self.extra_inputs = [k for k in ("index", "mask", "progress") if k in parameters]
        self.uses_teacher = bool(getattr(loss, "uses_teacher", True))

    def keys(self, side: str, models: Iterable[str]) -> list[str]:
        """Knowledge keys this term reads on ``side`` ("student" or "teacher")."""
        if side == "teacher" and not self.uses_teacher:
            return []
        source = self.student_source if side == "student" else self.teacher_source
        names = [source] if isinstance(source, str) else list(source)
        return [resolve_source(n, side, models) for n in names]

    def layer_names(self, side: str) -> list[str]:
        """Hooked layer paths of the side's own model (sources other than logits/topk)."""
        source = self.student_source if side == "student" else self.teacher_source
        names = [source] if isinstance(source, str) else list(source)
        return [n for n in names if n not in (LOGITS, TOPK)]

    def select(self, side: str, knowledge: dict[str, Any], models: Iterable[str]) -> Any:
        keys = self.keys(side, models)
        source = self.student_source if side == "student" else self.teacher_source
        missing = [k for k in keys if k not in knowledge]
        if missing:
            raise KeyError(
                f"loss term {self.name!r} reads {missing} but this step's knowledge has "
                f"{sorted(k for k in knowledge if not k.startswith('log.'))}"
            )
        values = [knowledge[k] for k in keys]
        return values[0] if isinstance(source, str) else values

    def forward(
        self,
        knowledge: dict[str, Any],
        batch: dict[str, Any],
        models: Iterable[str] = ("student", "teacher"),
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Unweighted loss value from the step's knowledge."""
        models = list(models)
        s = self.select("student", knowledge, models)
        if self.connector is not None:
            s = self.connector(s)
        t = self.select("teacher", knowledge, models) if self.uses_teacher else None
        extra = {
            "index": batch.get("index"),
            "mask": _attention_mask(batch),
            "progress": progress or Progress(),
        }
        kwargs = {k: extra[k] for k in self.extra_inputs}
        return self.loss(student=s, teacher=t, target=batch.get("target"), **kwargs)

    def factor(self, progress: Progress) -> float:
        """``weight * schedule(progress)``."""
        return self.weight * self.schedule(progress)


def _attention_mask(batch: dict[str, Any]) -> torch.Tensor | None:
    inputs = batch.get("input")
    if isinstance(inputs, dict):
        return inputs.get("attention_mask")
    return batch.get("attention_mask")


class Objective(nn.ModuleList):
    """The list of loss terms of a method, evaluated in one loop.

    Args:
        terms: the terms; names must be unique (they name the logs).

    Raises:
        ValueError: an empty list, duplicate names, or every term weighted 0 (the total is
            then the constant 0: no gradient reaches any model and a fit trains nothing).
    """

    def __init__(self, terms: Iterable[LossTerm]) -> None:
        terms = list(terms)
        if not terms:
            raise ValueError("the objective is empty: give at least one LossTerm")
        for term in terms:
            if not isinstance(term, LossTerm):
                raise TypeError(
                    f"every entry of loss_terms must be a LossTerm, got {type(term).__name__}: "
                    "wrap a loss as LossTerm(loss=<loss>, weight=...)"
                )
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"loss term names must be unique; {duplicates} appear twice: set `name:` on each term"
            )
        if all(t.weight == 0 for t in terms):
            raise ValueError(
                f"every loss term has weight 0 ({', '.join(f'{t.name}: 0' for t in terms)}): "
                "the objective is the constant 0, so no gradient reaches any model and a fit "
                "trains nothing; give at least one term a weight > 0 (e.g. weight: 1.0)"
            )
        super().__init__(terms)
        # FitNets-style stages: terms without pretrain_epochs start after the longest stage 1.
        stage = max(t.pretrain_epochs for t in terms)
        self.stage_one = stage
        for term in terms:
            if stage and term.pretrain_epochs == 0:
                term.schedule = _Chain(term.schedule, StartAt(stage))

    def keys(self, side: str, models: Iterable[str]) -> list[str]:
        """Every knowledge key the objective reads on ``side``, in order, without repeats."""
        keys: list[str] = []
        for term in self:
            keys += [k for k in term.keys(side, models) if k not in keys]
        return keys

    def layers(self, models: Iterable[str]) -> dict[str, list[str]]:
        """Hooked layers per model name: ``{"student": ["stage2"], "teacher": [...]}``."""
        models = list(models)
        layers: dict[str, list[str]] = {}
        for side in ("student", "teacher"):
            for key in self.keys(side, models):
                model, layer = split_key(key, models)
                if layer is not None and layer != TOPK:
                    layers.setdefault(model, [])
                    if layer not in layers[model]:
                        layers[model].append(layer)
        return layers

    @property
    def uses_teacher(self) -> bool:
        return any(t.uses_teacher for t in self)

    def evaluate(
        self,
        knowledge: dict[str, Any],
        batch: dict[str, Any],
        models: Iterable[str],
        progress: Progress,
    ) -> dict[str, torch.Tensor]:
        """``{"loss": sum_k weight_k * schedule_k * loss_k, <term name>: loss_k, ...}``.

        Terms whose schedule is inactive at ``progress`` are skipped (not computed).
        """
        models = list(models)
        losses: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in self:
            if not term.schedule.active(progress):
                continue
            value = term(knowledge, batch, models, progress)
            losses[term.name] = value
            weighted = term.factor(progress) * value.float()
            total = weighted if total is None else total + weighted
        if total is None:
            raise RuntimeError(f"no loss term is active at epoch {progress.epoch}")
        losses["loss"] = total
        return losses


class _Chain(Schedule):
    """Product of schedules (a term's own schedule times the stage start)."""

    def __init__(self, *schedules: Schedule) -> None:
        self.schedules = schedules

    def __call__(self, progress: Progress) -> float:
        factor = 1.0
        for schedule in self.schedules:
            factor *= schedule(progress)
        return factor

    def active(self, progress: Progress) -> bool:
        return all(s.active(progress) for s in self.schedules)
