"""Refuse a monitored metric name the run never logs, before it costs a training epoch.

``ModelCheckpoint(monitor="val/los")`` or ``EarlyStopping(monitor="val/accuracy")`` otherwise
fails only after the first epoch, with Lightning's raw ``MisconfigurationException`` (or
``RuntimeError``). :class:`MonitorCheck` (attached by every
:class:`~kd_lightning.methods.DistillationModule`) compares each monitored name (every callback
with a ``monitor`` and every ``ReduceLROnPlateau`` scheduler) with the names the module has
logged so far, and refuses one that is not there, listing the nearest logged names.

When each name is judged:

- at the end of the sanity check (before any training step), and at the end of the first
  validation when there is no sanity check: every ``val/...`` name, and every ``train/...``
  name that is the training counterpart of a logged validation name (the library logs the same
  names per stage; ``train/<x>``, ``train/<x>_step``, ``train/<x>_epoch``);
- at the end of the first training epoch (this callback runs first, before the monitoring
  callbacks' own checks): the rest, ``train/...`` names logged only in training and names
  without a stage prefix, which exist only once an epoch of training has logged them.

A name whose stage has logged nothing yet (``val/acc`` in a run without validation) is not
judged: Lightning itself only warns there. Only ``fit`` is checked. A study's preflight makes
the first judgement for every run before any trains, on the names the run's validation step
logs on its example batch (:func:`kd_lightning.bench.preflight.check_monitors`).
"""

from __future__ import annotations

import difflib
from typing import Any

import lightning as L


class UnknownMonitor(ValueError):
    """A callback or scheduler monitors a metric name that the run does not log."""


def monitored(trainer: Any) -> list[tuple[str, str]]:
    """``[(who, metric name)]`` for every monitoring callback and plateau scheduler."""
    found = []
    for callback in trainer.callbacks:
        name = getattr(callback, "monitor", None)
        if isinstance(name, str) and name and not isinstance(callback, MonitorCheck):
            found.append((f"{type(callback).__name__}(monitor={name!r})", name))
    for config in getattr(trainer, "lr_scheduler_configs", []) or []:
        if getattr(config, "reduce_on_plateau", False) and config.monitor:
            owner = type(config.scheduler).__name__
            found.append((f"the {owner} scheduler (monitor={config.monitor!r})", config.monitor))
    return found


def known_names(logged: set[str]) -> set[str]:
    """Logged names plus the training counterparts of logged validation names."""
    names = set(logged)
    for name in logged:
        if name.startswith("val/"):
            rest = name[len("val/") :]
            names |= {f"train/{rest}", f"train/{rest}_step", f"train/{rest}_epoch"}
    return names


def unknown_monitors(
    monitors: list[tuple[str, str]], logged: set[str], final: bool
) -> list[tuple[str, str]]:
    """The monitors to refuse now (see the module docstring for which are judged when)."""
    known = known_names(logged)
    stages = {n.split("/", 1)[0] for n in known if "/" in n}
    refused = []
    for who, name in monitors:
        if name in known:
            continue
        stage = name.split("/", 1)[0] if "/" in name else None
        if stage is not None and stage not in stages:
            continue  # that stage has not logged anything (yet): not judged
        if not final and (stage is None or stage == "train"):
            continue  # may be logged by the first training epoch
        refused.append((who, name))
    return refused


def refusal(refused: list[tuple[str, str]], logged: set[str], when: str) -> UnknownMonitor:
    """The error naming each refused monitor, its nearest logged names and the fix."""
    names = sorted(known_names(logged))
    lines = []
    for who, name in refused:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or names[:5]
        lines.append(f"{who} monitors {name!r}, which this run never logs; nearest: {near}")
    return UnknownMonitor(
        "; ".join(lines) + f". The fit stops {when}. Set monitor to a logged name (in a config: "
        "trainer.callbacks[...].init_args.monitor); every logged name: " + ", ".join(names)
    )


class MonitorCheck(L.Callback):
    """Refuse monitored metric names the module does not log (see the module docstring)."""

    def __init__(self) -> None:
        self.validated = False
        self.finished = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self in trainer.callbacks:  # judge before the monitors do
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)

    def _check(self, trainer: L.Trainer, final: bool, when: str) -> None:
        if getattr(trainer.state.fn, "value", trainer.state.fn) != "fit" or self.finished:
            return
        logged = set(trainer.callback_metrics)
        refused = unknown_monitors(monitored(trainer), logged, final)
        if refused:
            raise refusal(refused, logged, when)
        self.finished = final

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, final=False, when="before any training step (after the sanity check)")
        self.validated = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not self.validated:
            self._check(trainer, final=False, when="at its first validation")
            self.validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, final=True, when="after its first training epoch")
