"""The console entry point ``kd-lightning`` (also ``python -m kd_lightning``).

``kd-lightning fit|validate|test|predict -c experiments/<data>/<method>.yaml`` is LightningCLI
over every :class:`~kd_lightning.methods.DistillationModule` (by ``class_path``) and any
``LightningDataModule``; ``num_classes`` goes from the data to every model that takes it.
``kd-lightning study`` runs a research study (:mod:`kd_lightning.bench.study`) and
``kd-lightning export`` writes a checkpoint's student as one ONNX file
(:mod:`kd_lightning.export_command`).

What this CLI adds to LightningCLI:

* ``validate``/``test``/``predict`` evaluate trained weights: without ``--ckpt_path`` they refuse
  (``--untrained`` evaluates fresh weights on purpose), and a checkpoint written by another
  method or student than the config's is refused with both names (Lightning would otherwise
  rebuild the checkpoint's model and report it as the config's).
* ``predict`` writes ``predictions.csv`` (``index,pred,prob_0..``; see
  :class:`~kd_lightning.callbacks.prediction_writer.PredictionWriter`), configurable as
  ``--predictions.path`` / ``--predictions.overwrite``.
* Every checkpoint records the shape of one input sample (``kd_lightning_input``), so
  ``export`` can build an example input without the data.
* Errors are printed first and alone, noise is filtered: see :mod:`kd_lightning.cli_errors`.
* ``fit`` never writes over an earlier run's checkpoint (a ``ModelCheckpoint`` with a fixed file
  name) unless ``--overwrite`` is given: see
  :mod:`kd_lightning.callbacks.finished_checkpoints`; checkpoints are written atomically
  (:class:`~kd_lightning.callbacks.finished_checkpoints.AtomicCheckpointIO`). ``--ckpt_path``
  files are read without running code from them (``weights_only``).
* ``fit`` writes ``checkpoints/best.ckpt`` (by the method's ``monitor``), ``last.ckpt`` and
  ``config.yaml`` into the run's own folder, prints one line per epoch off a terminal and a
  summary with those paths at the end: see :mod:`kd_lightning.cli_run_files`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kd_lightning.callbacks.finished_checkpoints import (
    AtomicCheckpointIO,
    KeepFinishedCheckpoints,
)
from kd_lightning.callbacks.prediction_writer import PredictionWriter
from kd_lightning.cli_ckpt_path import (
    EVALUATING,
    check_evaluated_checkpoint,
    refuse_weights_that_do_not_fit,
)
from kd_lightning.cli_errors import (
    CLIError,
    quiet_evaluation_noise,
    quiet_first_run_checkpoint_dir,
    quiet_known_noise,
    run_with_clean_errors,
)
from kd_lightning.cli_run_files import (
    RemoveRefusedRun,
    RunFolderConfig,
    install_default_checkpoint,
    prepare_fit,
)
from kd_lightning.config_specs import record_config_specs
from kd_lightning.methods import DistillationModule
from kd_lightning.models.spec import _import_class, instantiate_config, refuse_trust_opt_ins

PROG = "kd-lightning"
SUBCOMMANDS = {
    "fit": "train a method: fit -c experiments/<data>/<method>.yaml",
    "validate": "evaluate a checkpoint (--ckpt_path) on the validation set",
    "test": "evaluate a checkpoint (--ckpt_path) on the test set",
    "predict": "write a checkpoint's probabilities and classes to predictions.csv",
    "study": "run configs x seeds, all checked before training, into a results table",
    "export": "write a checkpoint's student as one ONNX file (or a .pt2 program)",
}
INPUT_KEY = "kd_lightning_input"
"""Checkpoint key of :class:`RecordInputShape`: ``{"shape": [per-sample dims], "dtype": str}``."""


# --------------------------------------------------------------------------- num_classes link
def _accepts_num_classes(class_path: str) -> bool:
    try:
        cls = _import_class(class_path)
    except ImportError:
        return False
    return "num_classes" in inspect.signature(cls.__init__).parameters


def link_num_classes(node: Any, num_classes: int) -> None:
    """Set ``num_classes`` in every class spec under ``node`` whose class takes that argument.

    LightningCLI's ``link_arguments`` needs a fixed target path; methods hold their models under
    different names (``student``, ``model``, a list of peers, a chain of assistants), so the link
    from ``data.num_classes`` walks the model config instead. Like a LightningCLI link, the data
    decides: a value given for a model is replaced.
    """
    if isinstance(node, Namespace):
        class_path = node.get("class_path")
        init_args = node.get("init_args")
        if class_path and isinstance(init_args, Namespace) and _accepts_num_classes(class_path):
            init_args["num_classes"] = num_classes
        for value in vars(node).values():
            link_num_classes(value, num_classes)
    elif isinstance(node, (list, tuple)):
        for item in node:
            link_num_classes(item, num_classes)


class RecordInputShape(Callback):
    """Store the shape and dtype of one input sample in every checkpoint (``kd_lightning_input``).

    ``kd-lightning export`` builds its example input from it when no shape is given. Dict
    inputs (``model(**input)``) are not recorded.
    """

    def __init__(self) -> None:
        self.record: dict[str, Any] | None = None

    def _see(self, batch: Any) -> None:
        if self.record is not None:
            return
        if isinstance(batch, dict):
            inputs = batch.get("input")
        else:
            inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else None
        if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1:
            dtype = str(inputs.dtype).removeprefix("torch.")
            self.record = {"shape": list(inputs.shape[1:]), "dtype": dtype}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._see(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._see(batch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.record is not None:
            checkpoint[INPUT_KEY] = dict(self.record)


def configured_callbacks(cli: LightningCLI) -> list[Callback]:
    """The callbacks the config listed under ``trainer.callbacks`` (built), in order."""
    config = cli.config_init[cli.subcommand] if cli.subcommand else cli.config_init
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


# --------------------------------------------------------------------------- the CLI
class KDLightningCLI(LightningCLI):
    """LightningCLI for distillation: any method, any data module, ``num_classes`` from the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument(
            "--untrained",
            action=ActionYesNo,
            default=False,
            help="validate/test/predict without --ckpt_path: evaluate freshly initialised "
            "weights on purpose (a chance-level baseline).",
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="fit: write over the checkpoints of an earlier run that a ModelCheckpoint with "
            "a fixed file name (enable_version_counter: false) would replace; without it fit "
            "refuses before the first step.",
        )

    def parse_arguments(self, parser, args) -> None:
        # main() always passes the arguments explicitly (from sys.argv or from a caller), so
        # Lightning's warning about args given while sys.argv is set would fire on every call.
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        # Before Lightning replaces the model config with the checkpoint's hyperparameters.
        self._evaluated = check_evaluated_checkpoint(self.config)

    def _parse_ckpt_path(self) -> None:
        """Merge the evaluated checkpoint's hyperparameters into the model config.

        Lightning does this itself for checkpoints written through LightningCLI (they record
        ``_class_path``). For one written from Python it puts the init args at the model's top
        level, which subclass mode rejects ("Option 'model.init_args.num_classes' is not
        accepted"); here they become the init args of the config's method, whose class
        :func:`check_evaluated_checkpoint` compared with the checkpoint's.
        """
        checkpoint, self._evaluated = getattr(self, "_evaluated", None), None
        hparams = dict(checkpoint.get("hyper_parameters") or {}) if checkpoint else {}
        hparams.pop("_instantiator", None)
        # A checkpoint's settings become the model's arguments: a file may not opt in to
        # trusting code (jsonargparse checks each class_path against its declared type).
        refuse_trust_opt_ins(hparams, "refused the hyperparameters of --ckpt_path: ")
        if not hparams:
            super()._parse_ckpt_path()
            return
        subcommand = self.config.subcommand
        class_path = hparams.pop("_class_path", None)
        method = class_path or self.config[subcommand].model.class_path
        init_specs = (checkpoint.get("kd_lightning") or {}).get("init_specs") or {}
        if "loss_terms" in init_specs:  # objective-only arguments recorded beside loss terms
            for name in getattr(_import_class(method), "objective_args", ()):
                hparams.pop(name, None)  # (by earlier versions) never acted: left out
        if class_path is not None:  # written through LightningCLI: as Lightning merges it
            model = {"class_path": class_path, "dict_kwargs": hparams}
        else:
            model = {"class_path": method, "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        data_config = config.get("data")
        if data_config is None or config.get("model") is None:
            return
        # A datamodule reads no data in __init__ (Lightning's convention): cheap to build twice.
        try:
            datamodule = instantiate_config(data_config.as_dict())
        except (ValueError, TypeError, LookupError, OSError, ImportError) as err:
            raise CLIError(
                f"cannot build the data ({data_config.get('class_path')}): {err}"
            ) from err
        num_classes = getattr(datamodule, "num_classes", None)
        if isinstance(num_classes, int):
            link_num_classes(config["model"], num_classes)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        record_config_specs(self)

    def instantiate_trainer(self, **kwargs: Any):
        configured = configured_callbacks(self)  # before Lightning adds its defaults to the list
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, RecordInputShape())
        if self.subcommand in (None, "fit"):  # best.ckpt/last.ckpt, epoch lines, summary
            prepare_fit(trainer, self.model, configured)
        else:  # --ckpt_path restores the state of every callback that wrote the file
            install_default_checkpoint(trainer, self.model, configured)
        return trainer

    def before_fit(self) -> None:
        overwrite = bool(self.config[self.subcommand].get("overwrite"))
        self.trainer.callbacks.insert(0, KeepFinishedCheckpoints(overwrite))  # before any output
        self.trainer.callbacks.append(RemoveRefusedRun.before(self.trainer, overwrite))  # no trace
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's or a sharded writer
            strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                quiet_first_run_checkpoint_dir(callback.dirpath)

    def before_validate(self) -> None:
        quiet_evaluation_noise()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:  # Lightning restoring --ckpt_path into the built model
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if "Error(s) in loading state_dict" not in str(err) or not ckpt_path:
                raise
            refuse_weights_that_do_not_fit(self.model, ckpt_path, err)

    before_test = before_predict = before_validate


def build_cli(args: Sequence[str], run: bool = True, **kwargs: Any) -> KDLightningCLI:
    """The CLI over every method and data module (``run=False``: parse and instantiate only)."""
    quiet_known_noise()
    if not run:
        kwargs.setdefault("save_config_callback", None)
    kwargs.setdefault("save_config_callback", RunFolderConfig)  # config.yaml in the run folder
    # Errors reach main(), which prints the library's sentence first (never argparse's exit).
    no_exit = {"exit_on_error": False}
    kwargs.setdefault(
        "parser_kwargs", {**no_exit, **{name: no_exit for name in EVALUATING}, "fit": no_exit}
    )
    return KDLightningCLI(
        DistillationModule,
        None,  # any LightningDataModule, by class_path
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=list(args),
        run=run,
        **kwargs,
    )


def help_parser() -> argparse.ArgumentParser:
    """The top-level ``--help``: every subcommand with one line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=16, width=100),
        description="Knowledge distillation on PyTorch Lightning.",
        epilog=f"{PROG} <subcommand> --help lists a subcommand's options. Errors print one "
        "line; --traceback (or KD_LIGHTNING_TRACEBACK=1) shows the full traceback.",
    )
    parser.add_argument("--traceback", action="store_true", help="show an error's traceback")
    commands = parser.add_subparsers(title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, text in SUBCOMMANDS.items():
        commands.add_parser(name, help=text)
    return parser


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        help_parser().print_help(file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] == "export":
        from kd_lightning.export_command import main as export_main

        export_main(argv[1:])
        return
    build_cli(argv)


def main(args: Sequence[str] | None = None) -> None:
    """Run ``kd-lightning``: ``study`` and ``export`` go to their own parsers, the rest to
    LightningCLI. An error of the user's making prints one line and exits with status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "study":
        from kd_lightning.bench.study import main as study_main

        # The study reads --traceback itself: pass it through.
        run_with_clean_errors(f"{PROG} study", lambda rest: study_main(rest[1:]), argv, strip=False)
        return
    run_with_clean_errors(PROG, _dispatch, argv)


if __name__ == "__main__":
    main()
