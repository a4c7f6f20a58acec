"""Running one (run, seed) of a study: build its config in this process and fit it.

A study run is a LightningCLI config, built here exactly as ``kd-lightning fit -c`` would, over
*any* :class:`~lightning.pytorch.LightningModule` and *any*
:class:`~lightning.pytorch.LightningDataModule` (a user's own data module yielding dicts or
``(input, target)`` tuples included). Like the CLI, ``num_classes`` flows from the data module
to every model spec that takes it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from kd_lightning.bench.files import atomic_write_text
from kd_lightning.bench.plan import CHECKPOINT_NAME
from kd_lightning.config_specs import record_config_specs


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """The study prints one line per run; Lightning's per-run banners and known warnings go."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI(args=...) warns when the process has its own arguments
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            # Expected: a frozen teacher in eval mode; Lightning's own LeafSpec deprecation.
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists.*")
            yield
    finally:
        sys.argv = argv
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------- building a config
def _takes_num_classes(class_path: str) -> bool:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return "num_classes" in inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _link_num_classes(node: Any, num_classes: int) -> None:
    """Set ``num_classes`` in every class spec under ``node`` whose class takes it (the data decides)."""
    if isinstance(node, Namespace):
        class_path, init_args = node.get("class_path"), node.get("init_args")
        if class_path and isinstance(init_args, Namespace) and _takes_num_classes(class_path):
            init_args["num_classes"] = num_classes
        for value in vars(node).values():
            _link_num_classes(value, num_classes)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _link_num_classes(item, num_classes)


class StudyCLI(LightningCLI):
    """LightningCLI over any LightningModule and any LightningDataModule, parse and build only."""

    def before_instantiate_classes(self) -> None:
        from kd_lightning.models.spec import instantiate_config as instantiate  # a config: trusted

        data, model = self.config.get("data"), self.config.get("model")
        if data is None or model is None:
            return
        # A data module knows num_classes at construction and reads no data there: cheap to build.
        num_classes = getattr(instantiate(data.as_dict()), "num_classes", None)
        if isinstance(num_classes, int):
            _link_num_classes(model, num_classes)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # A user's own model records no spec itself: without the config's, its checkpoint
        # could not be rebuilt (load_student, a later run's PretrainedTeacher).
        record_config_specs(self)


def build_config(config_path: str | Path) -> StudyCLI:
    """Parse a LightningCLI YAML file and build its model, data module and trainer (no fit).

    A bad value raises jsonargparse's error around the library's own; :func:`root_message`
    finds the library's sentence in that chain.
    """
    return StudyCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=None,
        parser_kwargs={"exit_on_error": False},
        args=["-c", str(config_path)],
        run=False,
    )


def root_message(error: BaseException) -> str:
    """The sentence to show for ``error``: the library's own (or a user class's) message, not
    jsonargparse's wrappers around it (see :func:`kd_lightning.cli_errors.user_message`); for
    any other error (e.g. a ``RuntimeError`` subclass of the library) ``Type: message``."""
    from kd_lightning.cli_errors import user_message

    message = user_message(error)
    return message if message is not None else f"{type(error).__name__}: {error}".strip()


def write_config(config: dict[str, Any], path: Path) -> Path:
    """Write a resolved config as YAML (atomically)."""
    return atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


# --------------------------------------------------------------------------- fitting
def execute_run(
    config: dict[str, Any],
    run_dir: Path,
    callbacks: Sequence[Any] = (),
    extra_loggers: Sequence[Any] = (),
    ckpt_path: str | Path | None = None,
) -> dict[str, Any]:
    """Fit one resolved config in this process (optionally resuming); save ``final.ckpt``.

    Returns ``{"module", "datamodule", "checkpoint", "trainer"}``.
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(config, run_dir / "config.yaml")
    with quiet_lightning():
        cli = build_config(config_path)
        trainer = cli.trainer
        trainer.callbacks.extend(callbacks)
        if extra_loggers:
            trainer.loggers = [*trainer.loggers, *extra_loggers]
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        if trainer.state.status != TrainerStatus.FINISHED or trainer.interrupted:
            raise RuntimeError(
                f"the run in {str(run_dir)!r} did not finish (status {trainer.state.status}); "
                "rerun the study to continue it"
            )
        checkpoint = run_dir / CHECKPOINT_NAME
        # One temporary name on every rank: save_checkpoint is collective, rank 0 writes it.
        temporary = checkpoint.with_name(f".{CHECKPOINT_NAME}.tmp")
        trainer.save_checkpoint(temporary)
        if trainer.is_global_zero:
            os.replace(temporary, checkpoint)  # a kill mid-write leaves no half checkpoint
    return {
        "module": cli.model,
        "datamodule": cli.datamodule,
        "checkpoint": checkpoint,
        "trainer": trainer,
    }
