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
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

SPEC_ATTRIBUTE = "_kd_spec"


def class_path_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if inspect.isclass(obj_or_cls) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def records_init_args(cls: type) -> type:
    """Class decorator: the instance remembers ``{"class_path", "init_args"}`` it was built with.

    The one mechanism by which models of the zoo, loss terms, losses, connectors and schedules
    become rebuildable from a checkpoint (:func:`object_spec` turns the record into plain data).
    The class's own constructor records; so does a subclass that inherits it unchanged. A
    subclass with its own ``__init__`` records only if it is decorated too (its arguments are
    not its parent's), so no object ever carries a spec that would rebuild something else.
    """
    original_init = cls.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if type(self) is cls or type(self).__init__ is __init__:
            init_args = _bound_init_args(signature, self, args, kwargs)
            if init_args is not None:
                self.__dict__[SPEC_ATTRIBUTE] = {
                    "class_path": class_path_of(self),
                    "init_args": init_args,
                }

    cls.__init__ = __init__
    return cls


def _bound_init_args(
    signature: inspect.Signature, obj: Any, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Keyword arguments that rebuild ``obj`` (``None`` when extra positionals make it unknown)."""
    bound = signature.bind(obj, *args, **kwargs)
    bound.apply_defaults()
    init_args: dict[str, Any] = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if index == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            init_args.update(value)
        else:
            init_args[name] = value
    return init_args


class Unrecordable(TypeError):
    """A value has no spec (a user's own class or a function): it cannot be rebuilt from data."""


def object_spec(value: Any) -> Any:
    """``value`` as plain data that :func:`instantiate` rebuilds, nested specs included.

    Objects built by a :func:`records_init_args` class become ``{"class_path", "init_args"}``
    with every argument converted the same way; numbers, strings, ``None``, tensors, lists,
    tuples (as lists) and string-keyed dicts stay as they are; paths become strings.

    Raises:
        Unrecordable: some part records no spec; the message names its type.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [object_spec(v) for v in value]
    if isinstance(value, dict) and "class_path" not in value and "_class_path" not in value:
        if not all(isinstance(k, str) for k in value):
            raise Unrecordable("a dict with non-string keys")
        return {k: object_spec(v) for k, v in value.items()}
    if isinstance(value, dict):  # already a spec (from a config)
        return value
    spec = getattr(value, "__dict__", {}).get(SPEC_ATTRIBUTE)
    if spec is None:
        raise Unrecordable(f"{type(value).__qualname__} records no init arguments")
    init_args = {k: object_spec(v) for k, v in spec["init_args"].items()}
    return {"class_path": spec["class_path"], "init_args": init_args}


def try_object_spec(value: Any) -> Any:
    """:func:`object_spec`, or ``None`` when some part cannot be recorded."""
    try:
        return object_spec(value)
    except Unrecordable:
        return None


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


class UnsafeSpecError(ValueError):
    """A recorded spec names something a file may not make kd_lightning call."""


ALLOWED_BASES: tuple[str, ...] = (
    "torch.nn.modules.module.Module",
    "kd_lightning.objective.schedule.Schedule",
    "kd_lightning.synthesis.base.InputSynthesiser",
)
"""The only classes (and their subclasses) a spec read from a file may build: models, losses,
loss terms and connectors are ``nn.Module``; loss-weight schedules and the data-free method's
input synthesisers are the two non-module kinds our own checkpoints record."""

OPT_INS: tuple[str, ...] = ("trust_pickled_code", "trust_remote_code")
"""Arguments that trust code; only the user sets them, never a recorded spec."""

_REFUSAL = (
    "A model recipe read from a file may only name a class derived from "
    "torch.nn.Module, kd_lightning.objective.Schedule or kd_lightning.synthesis.InputSynthesiser, "
    "so a file cannot make kd_lightning run an arbitrary callable; trust_pickled_code=True does "
    "not lift this (it only trusts the unpickler). If the file is yours, build the object in "
    "Python and pass it (load_student(path, model=...), Method.load_from_checkpoint(path, "
    "student=...), PretrainedTeacher(path, model=...))."
)


def trust_opt_ins(tree: Any, where: str = "") -> list[str]:
    """Where a (nested) dict/list sets one of :data:`OPT_INS` to a true value, at any depth
    (e.g. ``config.trust_remote_code`` inside a Hugging Face model's ``config`` dict)."""
    found: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{where}.{key}" if where else str(key)
            if key in OPT_INS and value:
                found.append(path)
            found += trust_opt_ins(value, path)
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            found += trust_opt_ins(value, f"{where}[{index}]")
    return found


def refuse_trust_opt_ins(tree: Any, context: str = "") -> None:
    """Refuse settings read from a file that set a trust opt-in anywhere in ``tree``.

    Raises:
        UnsafeSpecError: naming the first such setting.
    """
    found = trust_opt_ins(tree)
    if found:
        raise UnsafeSpecError(
            f"{context}{found[0]}=true taken from a file: only you can opt in to trusting "
            f"code, in your own call or config. {_REFUSAL}"
        )


def _allowed(obj: Any) -> bool:
    names = {f"{c.__module__}.{c.__qualname__}" for c in inspect.getmro(obj)}
    return any(name in names for name in ALLOWED_BASES)


def _plan(spec: Any, checked: bool) -> Any:
    """Resolve every class of a spec tree (checking each when ``checked``) before any call."""
    if isinstance(spec, dict) and ("class_path" in spec or "_class_path" in spec):
        if "class_path" in spec:
            class_path, init_args = spec["class_path"], dict(spec.get("init_args") or {})
            init_args.update(spec.get("dict_kwargs") or {})
        else:
            class_path = spec["_class_path"]
            init_args = {k: v for k, v in spec.items() if k != "_class_path"}
        if checked and not isinstance(class_path, str):
            raise UnsafeSpecError(f"a recorded spec has class_path {class_path!r} (not a name). "
                                  + _REFUSAL)  # fmt: skip
        target = _import_class(class_path)
        if checked:
            if not inspect.isclass(target):
                raise UnsafeSpecError(
                    f"refused to build {class_path!r}: it is a {type(target).__name__}, not a "
                    f"class. {_REFUSAL}"
                )
            if not _allowed(target):
                raise UnsafeSpecError(
                    f"refused to build {class_path!r}: the class is not a torch.nn.Module, "
                    f"Schedule or InputSynthesiser. {_REFUSAL}"
                )
            refuse_trust_opt_ins(init_args, f"refused to build {class_path!r}: ")
        return (target, {k: _plan(v, checked) for k, v in init_args.items()})
    if isinstance(spec, list):
        return [_plan(v, checked) for v in spec]
    return _Value(spec)


class _Value:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _build(plan: Any) -> Any:
    if isinstance(plan, tuple):
        target, args = plan
        return target(**{k: _build(v) for k, v in args.items()})
    if isinstance(plan, list):
        return [_build(v) for v in plan]
    return plan.value


def instantiate(spec: Any) -> Any:
    """Build an object from a (possibly nested) ``{"class_path", "init_args"}`` spec.

    Every spec this library reads comes, or may come, from a file (a checkpoint's
    ``student_spec``/``init_specs``/``hyper_parameters``), so every class of the tree is
    resolved and checked before anything is called: only classes derived from
    :data:`ALLOWED_BASES` (never a function), and no :data:`OPT_INS` argument set. Also accepts
    Lightning's hparams form ``{"_class_path": ..., **init_args}``. Values that are not specs
    are returned unchanged.

    Raises:
        UnsafeSpecError: a part names a function, another class, or sets a trust opt-in; the
            message names its class path. Nothing was called.
        ImportError: a class path cannot be imported.
    """
    return _build(_plan(spec, checked=True))


def instantiate_config(spec: Any) -> Any:
    """:func:`instantiate` without the allow-list, for the user's own config (a data module and
    what it nests): never for a spec read from a checkpoint or any other file."""
    return _build(_plan(spec, checked=False))
