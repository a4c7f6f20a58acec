"""Checkpoints of every method: frozen teachers left out, the student artifact written in,
exact resume (random generators restored), and rebuilding a method from its file.

See :mod:`kd_lightning.artifact` for the artifact record every loader reads.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from kd_lightning.artifact import CHECKPOINT_KEY, read_checkpoint, student_record
from kd_lightning.data.split_identity import check_split_identity
from kd_lightning.methods.checks import rng_state, set_rng_state
from kd_lightning.models.spec import Unrecordable, instantiate, model_spec, object_spec
from kd_lightning.teachers import FrozenTeacher


def spec_of(value: Any) -> Any:
    """A ``class_path``/``init_args`` spec of a module argument, or ``None`` when unknown."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        specs = [spec_of(v) for v in value]
        return specs if specs and all(s is not None for s in specs) else None
    return model_spec(value) if isinstance(value, nn.Module) else None


class StudentArtifactCheckpoints:
    """Checkpoint hooks of :class:`~kd_lightning.methods.DistillationModule` (a mixin)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        # The objective the caller gave (not the defaults a method builds from temperature or
        # alpha, which its hyperparameters rebuild): recorded so a run built in Python reloads
        # with its own loss terms, connectors and learnable loss parts.
        instance = super().__new__(cls)
        try:
            given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
        except TypeError:  # __init__ reports wrong arguments itself
            given = {}
        terms, spec, unrecorded = given.get("loss_terms"), None, None
        if terms is not None:
            try:
                spec = object_spec(terms)
            except Unrecordable as why:
                unrecorded = str(why)
        instance.__dict__["_loss_terms_record"] = (spec, unrecorded)
        return instance

    def unrecorded_arguments(self) -> dict[str, str]:
        """``{argument: why}`` of arguments given in Python that no spec can rebuild."""
        spec, why = self.__dict__.get("_loss_terms_record", (None, None))
        if why is None or "loss_terms" in self.model_specs:  # the CLI recorded its config
            return {}
        return {"loss_terms": why}

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen teachers (kept out of checkpoints)."""
        return tuple(
            f"{name}."
            for name, module in self.named_modules()
            if name and isinstance(module, FrozenTeacher)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.raise_if_tripped()
        self.nonfinite.check_weights((n, p) for n, p in self.named_parameters() if p.requires_grad)
        prefixes = self.frozen_prefixes()
        if prefixes:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)
            }
        exported = self.exported_name
        path = self.sources[exported]
        top = path.split(".")[0]
        spec = self.model_specs.get(top)
        if isinstance(spec, list):
            spec = spec[int(path.split(".")[1])]
        # Callbacks wrote first (the QAT callback's compression record): merge, never replace.
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update({
            "format": 2,
            "student_spec": spec if spec is not None else model_spec(self.exported),
            "student_prefix": f"{path}.",
            "num_classes": self.num_classes,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_specs": self.init_specs(),
            "unrecorded": self.unrecorded_arguments(),
            "rng": rng_state(),
        })  # fmt: skip
        split = self.data_split_identity()
        if split is not None:  # evaluating this checkpoint later compares its splits
            checkpoint[CHECKPOINT_KEY]["data_split"] = split

    def data_split_identity(self) -> dict[str, Any] | None:
        """The attached data module's split identity (``None`` without one, or outside a
        trainer); see :mod:`kd_lightning.data.split_identity`."""
        trainer = getattr(self, "_trainer", None)
        identity = getattr(getattr(trainer, "datamodule", None), "split_identity", None)
        return identity() if callable(identity) else None

    def init_specs(self) -> dict[str, Any]:
        """Specs of every module argument that can be rebuilt (for :meth:`load_from_checkpoint`)."""
        specs = {}
        terms = self.__dict__.get("_loss_terms_record", (None, None))[0]
        if terms is not None:
            specs["loss_terms"] = terms
        for name in self.hparams_ignore:
            spec = spec_of(getattr(self, name, None))
            if spec is not None and name not in self.teacher_args:
                specs[name] = spec
        specs.update(self.model_specs)
        return specs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen teachers come from their own source, not from this checkpoint: put their
        # current weights back so strict loading (of everything trained) holds.
        prefixes = self.frozen_prefixes()
        if prefixes:
            own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
            checkpoint["state_dict"].update(own)
        from kd_lightning.compression.loading import compression_record, prepare_for_state_dict

        prepare_for_state_dict(self, checkpoint["state_dict"], compression_record(checkpoint))
        record = checkpoint.get(CHECKPOINT_KEY, {})
        if self._trainer is not None:  # evaluated (or resumed) on the splits of its fit only
            stage = getattr(self.trainer.state.fn, "value", str(self.trainer.state.fn))
            check_split_identity(record.get("data_split"), self.data_split_identity(), stage)
        if "rng" in record and self._trainer is not None:
            set_rng_state(record["rng"])  # resume draws the numbers an unbroken run draws

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=True, **kwargs
    ):
        """Rebuild a trained method from its checkpoint (frozen teachers default to ``None``).

        Models are rebuilt from their recorded specs; arguments without one (a model or loss
        built in Python outside the zoo) must be passed as keyword arguments.

        Raises:
            ValueError: a required argument cannot be rebuilt; the message names it.
        """
        checkpoint = read_checkpoint(checkpoint_path)
        record = student_record(checkpoint, checkpoint_path)
        args = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items()
                if not k.startswith("_")}  # fmt: skip
        args.update({k: instantiate(v) for k, v in record.get("init_specs", {}).items()})
        if "loss_terms" in record.get("init_specs", {}):  # recorded before these were refused
            for name in getattr(cls, "objective_args", ()):  # beside loss_terms: never acted
                args.pop(name, None)
        for name in cls.teacher_args:
            args.setdefault(name, None)
        unrecorded = {k: v for k, v in record.get("unrecorded", {}).items() if k not in kwargs}
        if unrecorded:
            name, why = next(iter(unrecorded.items()))
            raise ValueError(
                f"{str(checkpoint_path)!r} was trained with `{name}` built in Python that no "
                f"spec records ({why}): pass them, e.g. {cls.__name__}.load_from_"
                f"checkpoint(path, {name}=<the same objects>), or decorate the class with "
                "kd_lightning.models.records_init_args so checkpoints record it"
            )
        args.update(kwargs)
        parameters = inspect.signature(cls.__init__).parameters
        missing = [
            n for n, p in parameters.items()
            if n != "self" and p.default is inspect.Parameter.empty and n not in args
            and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]  # fmt: skip
        if missing:
            raise ValueError(
                f"{str(checkpoint_path)!r} does not record how to rebuild {missing} (built in "
                f"Python): pass them, e.g. {cls.__name__}.load_from_checkpoint(path, "
                f"{missing[0]}=<the same module>)"
            )
        args = {k: v for k, v in args.items() if k in parameters}
        model = cls(**args)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=strict)
        if map_location is not None:
            model = model.to(map_location)
        return model.eval()
