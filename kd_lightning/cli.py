"""The console entry point ``kd-lightning`` (also ``python -m kd_lightning``).

``kd-lightning fit|validate|test|predict -c experiments/<data>/<method>.yaml`` is LightningCLI
over every :class:`~kd_lightning.methods.DistillationModule` and
:class:`~kd_lightning.data.TransferSetDataModule`. ``kd-lightning study <study.yaml>`` runs a
research study (configs x seeds -> results table), see :mod:`kd_lightning.bench.study`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from kd_lightning.data import TransferSetDataModule
from kd_lightning.methods import DistillationModule
from kd_lightning.models.spec import _import_class, instantiate


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


class KDLightningCLI(LightningCLI):
    """LightningCLI for distillation: any method, any transfer set, ``num_classes`` from the data."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        data_config = config.get("data")
        if data_config is None or config.get("model") is None:
            return
        # A datamodule knows num_classes at construction and reads no data there: cheap to build.
        datamodule = instantiate(data_config.as_dict())
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None:
            link_num_classes(config["model"], num_classes)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        record_config_specs(self)


def _config_specs(init_args: Any) -> dict[str, Any]:
    """``{argument: spec}`` of every class-valued model argument in a parsed config."""
    specs: dict[str, Any] = {}
    for name, value in vars(init_args).items():
        if name in ("optimizer", "lr_scheduler"):  # callables, rebuilt by the method's default
            continue
        plain = value.as_dict() if isinstance(value, Namespace) else value
        if isinstance(plain, dict) and "class_path" in plain:
            specs[name] = plain
        elif isinstance(value, list) and value and all(
            isinstance(v, Namespace) and "class_path" in v for v in value
        ):
            specs[name] = [v.as_dict() for v in value]
    return specs


def record_config_specs(cli: LightningCLI) -> None:
    """Give the method the specs of its module arguments from the parsed config."""
    config = cli.config[cli.subcommand] if cli.subcommand else cli.config
    model_config = config.get("model")
    init_args = model_config.get("init_args") if isinstance(model_config, Namespace) else None
    if init_args is not None and hasattr(cli.model, "record_model_specs"):
        cli.model.record_model_specs(_config_specs(init_args))


def build_cli(args: Sequence[str], run: bool = True, **kwargs: Any) -> KDLightningCLI:
    """The CLI over every method and transfer set (``run=False``: parse and instantiate only)."""
    if not run:
        kwargs.setdefault("save_config_callback", None)
        # Called from Python (a study, a test): the process's own argv is not for this CLI.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
    return KDLightningCLI(
        DistillationModule,
        TransferSetDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=list(args),
        run=run,
        **kwargs,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Run the CLI: ``study`` goes to the study runner, everything else to LightningCLI."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "study":
        from kd_lightning.bench.study import main as study_main

        study_main(argv[1:])
        return
    if argv and argv[0] == "export":
        from kd_lightning.export_command import main as export_main

        export_main(argv[1:])
        return
    build_cli(argv)


if __name__ == "__main__":
    main()
