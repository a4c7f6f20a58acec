"""Model specs: the ``{"class_path", "init_args"}`` recipe that rebuilds a model from a checkpoint.

A checkpoint written by kd_lightning stores the student's spec next to its weights, so
:func:`kd_lightning.teachers.load_student` (and :class:`~kd_lightning.teachers.PretrainedTeacher`)
can rebuild the student without the config that trained it. Models built by LightningCLI get
their spec from the parsed config; the zoo's own models record theirs at construction with
:func:`records_init_args`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from torch import nn

SPEC_ATTRIBUTE = "_kd_spec"


def class_path_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if inspect.isclass(obj_or_cls) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def records_init_args(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: the instance remembers ``{"class_path", "init_args"}`` it was built with.

    Only the outermost constructor records (a subclass's call to ``super().__init__`` does not
    overwrite the subclass's own spec).
    """
    original_init = cls.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if type(self) is cls or SPEC_ATTRIBUTE not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
            self.__dict__[SPEC_ATTRIBUTE] = {
                "class_path": class_path_of(self),
                "init_args": init_args,
            }

    cls.__init__ = __init__
    return cls


def model_spec(module: nn.Module) -> dict[str, Any] | None:
    """The spec a module was built with, or None when it cannot be known (a user's own model)."""
    spec = module.__dict__.get(SPEC_ATTRIBUTE)
    return (
        None
        if spec is None
        else {"class_path": spec["class_path"], "init_args": dict(spec["init_args"])}
    )


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"cannot import {class_path!r} to rebuild the model; install or import the package "
            "that defines it"
        ) from err


def instantiate(spec: Any) -> Any:
    """Build an object from a (possibly nested) ``{"class_path", "init_args"}`` spec.

    Also accepts Lightning's hparams form ``{"_class_path": ..., **init_args}``. Values that are
    not specs are returned unchanged.
    """
    if isinstance(spec, dict) and ("class_path" in spec or "_class_path" in spec):
        if "class_path" in spec:
            class_path, init_args = spec["class_path"], dict(spec.get("init_args") or {})
            init_args.update(spec.get("dict_kwargs") or {})
        else:
            class_path = spec["_class_path"]
            init_args = {k: v for k, v in spec.items() if k != "_class_path"}
        return _import_class(class_path)(**{k: instantiate(v) for k, v in init_args.items()})
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec
