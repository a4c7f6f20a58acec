"""Checks before a study trains anything: every run is built and checked on one example batch.

A typo in the 4th run of a study (a layer name, ``temperature: 0``, a teacher of the wrong
size, a data module without a test split) must not wait for runs 1-3 to train. Before the first
run trains, :func:`preflight` builds every run that is still to do, exactly as it will be
trained (same parser, same overrides), and runs the method's own start-up checks on one example
batch. Runs that need a teacher not trained yet get a *stand-in*: the needed run's untrained
student, saved as a checkpoint in a temporary folder, so architecture and shape checks between
teacher and student run now. Teacher caches of such runs are redirected to that folder too, so
no cache made from a stand-in is ever written where a real run reads. Nothing under the
study's output folder is written, and nothing trains.

All failures are collected and reported together, each naming the run and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from kd_lightning.bench.evaluate import implements
from kd_lightning.bench.plan import CHECKPOINT_NAME, PlannedRun, digest, set_dotted
from kd_lightning.bench.run import build_config, quiet_lightning, root_message, write_config
from kd_lightning.bench.study_file import StudyError
from kd_lightning.callbacks.monitor_check import monitored, refusal, unknown_monitors
from kd_lightning.methods.checks import check_teacher_cache, check_trainer, untouched


class PreflightError(StudyError):
    """One or more runs of a study cannot start; the message names each run and the fix.

    Attributes:
        failures: ``{run name: message}``.
    """

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = failures
        lines = [f"  - run {name!r}: {message}" for name, message in failures.items()]
        super().__init__(
            f"{len(failures)} run(s) of the study cannot start; nothing has trained yet. Fix "
            "each run's config (or its `overrides` / `--set`) and rerun:\n" + "\n".join(lines)
        )


def example_batch(datamodule: Any) -> dict[str, Any]:
    """One training batch as the method's first step will see it (a normalised dict).

    Uses the data module's own ``example_batch()`` when it has one (the library's transfer
    sets: cheap, no loader); otherwise the first batch of ``train_dataloader()`` after
    ``prepare_data``/``setup("fit")`` and the batch-transfer hooks, as a Trainer would.
    """
    from kd_lightning.data.batch import normalise_batch

    if callable(getattr(datamodule, "example_batch", None)):
        return normalise_batch(datamodule.example_batch())
    if not implements(datamodule, "train_dataloader"):
        raise ValueError(
            f"{type(datamodule).__name__} has no train_dataloader(); give the data module one"
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()), None)
    if batch is None:
        raise ValueError(
            f"the training set of {type(datamodule).__name__} is empty (its train_dataloader "
            "yields no batch); check the data path and any filtering"
        )
    batch = datamodule.on_before_batch_transfer(batch, 0)
    batch = datamodule.on_after_batch_transfer(batch, 0)
    return normalise_batch(batch)


@contextlib.contextmanager
def attached(module: Any, trainer: Any) -> Iterator[None]:
    """``module.trainer = trainer`` for the block (as a fit attaches it), then detached again.

    What the module reads from its trainer before the first step is then the planned run's:
    ``max_epochs`` for schedules (:class:`~kd_lightning.objective.Progress`, PS-KD's
    alpha_t), epoch 0 and step 0. ``None`` or a module without a ``trainer`` property (a
    plain object) is left alone.
    """
    if trainer is None or not isinstance(module, LightningModule):
        yield
        return
    module.trainer = trainer
    try:
        yield
    finally:
        module.trainer = None


def startup_checks(
    module: Any, datamodule: Any, example: dict[str, Any], trainer: Any = None
) -> None:
    """The method's own start-up checks on ``example``, without fitting and without changing
    the module's state that training would see (the module checked here is thrown away).

    A method that defines a public ``check_example(batch)`` is asked through it, with
    ``trainer`` (the run's planned Trainer, not fitting) attached as a fit would attach it, so
    schedules see the run's ``max_epochs``; otherwise the checks
    :class:`~kd_lightning.methods.DistillationModule` runs in ``setup`` are called one by one
    (class counts of every output model, then ``validate_setup``).
    """
    if not hasattr(module, "student"):
        raise ValueError(
            f"{type(module).__name__} has no `student`: a study evaluates and exports "
            "`module.student`; use a kd_lightning method (DistillationModule subclass) or give "
            "your LightningModule a `student` attribute"
        )
    check = getattr(module, "check_example", None)
    if callable(check):
        with attached(module, trainer):
            check(example)
        cache = getattr(datamodule, "teacher_cache", None)
        if cache is not None and hasattr(cache, "provenance"):  # what setup checks in a run
            check_teacher_cache(module, cache.provenance)
        return
    data_classes = getattr(datamodule, "num_classes", None)
    if getattr(module, "num_classes", None) is None and data_classes is not None:
        module.num_classes = data_classes
    elif data_classes is not None and module.num_classes != data_classes:
        raise ValueError(
            f"the model is set up for num_classes={module.num_classes} but the data has "
            f"{data_classes} classes; set model.init_args.num_classes to {data_classes} (or "
            "leave it out: it is taken from the data)"
        )
    if hasattr(module, "_check_class_counts"):  # the current base's check (no public hook yet)
        module._check_class_counts(example)
    if callable(getattr(module, "validate_setup", None)):
        module.validate_setup(example)


def validation_names(module: Any, example: dict[str, Any], trainer: Any) -> set[str] | None:
    """The metric names ``module`` logs in a validation step on ``example`` (its ``log`` and
    ``log_dict`` recorded, not run; every state restored); ``None`` when the step cannot run
    outside a fit, or the module also logs at the end of a validation epoch (names not seen
    here): the run's own :class:`~kd_lightning.callbacks.monitor_check.MonitorCheck` then
    judges its monitors when it starts."""
    if not callable(getattr(module, "validation_step", None)):
        return None
    if type(module).on_validation_epoch_end is not LightningModule.on_validation_epoch_end:
        return None
    names: set[str] = set()

    def log(name: str, *args: Any, **kwargs: Any) -> None:
        names.add(name)

    def log_dict(values: Any, *args: Any, **kwargs: Any) -> None:
        names.update(str(k) for k in dict(values.items()))

    module.log, module.log_dict = log, log_dict  # instance attributes shadow the methods
    try:
        with attached(module, trainer), untouched(module):
            module.validation_step(example, 0)
    except Exception:  # noqa: BLE001 - a step that needs a running fit: judged at run time
        return None
    finally:
        del module.log, module.log_dict
    return names


def check_monitors(module: Any, example: dict[str, Any], trainer: Any) -> None:
    """Refuse a monitored ``val/...`` name that the run's validation step does not log (the
    judgement :class:`~kd_lightning.callbacks.monitor_check.MonitorCheck` makes after a fit's
    sanity check; names logged only in training are judged when the run trains)."""
    monitors = monitored(trainer)
    names = validation_names(module, example, trainer) if monitors else None
    if names:
        refused = unknown_monitors(monitors, names, final=False)
        if refused:
            raise refusal(refused, names, "in the preflight, before any run trains")


def refuse_several_processes(trainer: Any) -> None:
    """A study runs each run inside its own process, on one device: refuse more.

    Its loop builds, fits, evaluates, tabulates and resumes every run in the process that
    reads the study file; a multi-process strategy would start the study again in every
    process (``ddp`` re-runs the command line) or pickle its callbacks into them
    (``ddp_spawn``), and the table would be written by each. Train such a config alone instead.

    Raises:
        ValueError: the trainer would run in more than one process; names the fix.
    """
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world > 1:
        raise ValueError(
            f"the trainer would run {world} processes (devices x num_nodes), but a study runs "
            "each run inside its own process on one device (it evaluates, tabulates and "
            "resumes every run itself); set trainer.devices: 1 and trainer.num_nodes: 1 in the "
            "run's config (or --set trainer.devices=1), or train this config on several "
            "devices alone with `kd-lightning fit -c <config>`"
        )


def save_stand_in(module: Any, path: Path) -> Path:
    """Save ``module``'s untrained student as a checkpoint a teacher loader reads."""
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # the base records the student's spec here
    torch.save(checkpoint, path)
    return path


def _redirect_teacher_cache(config: dict[str, Any], folder: Path) -> None:
    """Point a run's teacher cache into the preflight folder (one file per original path, so
    runs that share a cache share its stand-in too and it is built once)."""
    data = (config.get("data") or {}).get("init_args") or {}
    cache = data.get("teacher_cache")
    if isinstance(cache, dict) and isinstance(cache.get("init_args"), dict):
        original = str(cache["init_args"].get("path"))
        cache["init_args"]["path"] = str(folder / f"cache-{digest(original)[:12]}.kdtc")


def _check_one(
    item: PlannedRun, folder: Path, checkpoints: dict[str, Path], stand_ins: set[str]
) -> Any:
    """Build ``item``'s config with stand-ins and check it; return the built method."""
    config = copy.deepcopy(item.config)
    for key, dep in item.run.needs.items():
        set_dotted(config, key, str(checkpoints[dep]))
    if set(item.run.needs.values()) & stand_ins:
        _redirect_teacher_cache(config, folder)
    trainer = config.setdefault("trainer", {})
    trainer.update(default_root_dir=str(folder / "root"), logger=False)
    path = write_config(config, folder / "configs" / f"{len(list(folder.glob('configs/*')))}.yaml")
    cli = build_config(path)
    refuse_several_processes(cli.trainer)
    check_trainer(cli.trainer, "fit")  # the checks a fit makes at start-up
    example = example_batch(cli.datamodule)
    startup_checks(cli.model, cli.datamodule, example, cli.trainer)
    check_monitors(cli.model, example, cli.trainer)
    if not implements(cli.datamodule, "test_dataloader"):
        raise ValueError(
            f"{type(cli.datamodule).__name__} has no test_dataloader(); a study reports test "
            "accuracy: give the data module a test_dataloader() method"
        )
    return cli.model


def preflight(plan: Sequence[PlannedRun], needed: set[str], say: Any = None) -> list[str]:
    """Build and check every run of ``plan`` that is not done, before anything trains.

    Each run is checked once (with its first seed that is still to do). Raises
    :class:`PreflightError` naming every run that cannot start; returns the checked run names.
    """
    todo: dict[str, PlannedRun] = {}
    for item in plan:
        if item.status != "done":
            todo.setdefault(item.run.name, item)
    if not todo:
        return []
    done = {(p.run.name, p.seed): p.run_dir / CHECKPOINT_NAME for p in plan if p.status == "done"}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kd-study-preflight-") as tmp, quiet_lightning():
        folder = Path(tmp)
        (folder / "configs").mkdir()
        stand_in_paths: dict[str, Path] = {}
        for name, item in todo.items():
            checkpoints: dict[str, Path] = {}
            missing = []
            for dep in dict.fromkeys(item.run.needs.values()):
                if (dep, item.dep_seeds[dep]) in done:
                    checkpoints[dep] = done[(dep, item.dep_seeds[dep])]
                elif dep in stand_in_paths:
                    checkpoints[dep] = stand_in_paths[dep]
                else:
                    missing.append(dep)
            if missing:
                failures[name] = f"not checked: it needs {missing}, which cannot start"
                continue
            stand_ins = {d for d in checkpoints if checkpoints[d] == stand_in_paths.get(d)}
            try:
                module = _check_one(item, folder, checkpoints, stand_ins)
                if name in needed:
                    stand_in_paths[name] = save_stand_in(module, folder / f"{name}.ckpt")
            except Exception as error:  # noqa: BLE001 - reported with the run's name below
                config = item.run.config if isinstance(item.run.config, Path) else "inline config"
                failures[name] = f"{root_message(error)} (config: {config})"
    if failures:
        raise PreflightError(failures)
    if say is not None:
        say(f"preflight: {len(todo)} run(s) built and checked on an example batch", flush=True)
    return list(todo)
