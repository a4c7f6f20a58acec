"""Model specs from a parsed LightningCLI config, shared by ``kd-lightning fit`` and studies.

A model the zoo did not build (a user's own ``nn.Module`` named by ``class_path``) records no
spec itself; the parsed config knows it. Both CLIs hand those specs to the method, so every
checkpoint's student artifact can rebuild the model (``load_student``, ``PretrainedTeacher``).
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace


def config_specs(init_args: Namespace) -> dict[str, Any]:
    """``{argument: spec}`` of every class-valued module argument in a parsed model config."""
    specs: dict[str, Any] = {}
    for name, value in vars(init_args).items():
        if name in ("optimizer", "lr_scheduler"):  # callables: the method's default rebuilds
            continue
        if isinstance(value, Namespace) and value.get("class_path"):
            specs[name] = value.as_dict()
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, Namespace) and v.get("class_path") for v in value)
        ):
            specs[name] = [v.as_dict() for v in value]
    return specs


def record_config_specs(cli: Any) -> None:
    """Give ``cli.model`` (a LightningCLI's method) the specs of its module arguments."""
    config = cli.config[cli.subcommand] if cli.subcommand else cli.config
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if isinstance(init_args, Namespace) and hasattr(cli.model, "record_model_specs"):
        cli.model.record_model_specs(config_specs(init_args))
