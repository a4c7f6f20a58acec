"""``DistillationModule``: the template every distillation method follows.

The base builds, freezes and records every model a method names in its class attributes, runs
the knowledge sources, evaluates the objective (a list of
:class:`~kd_lightning.objective.LossTerm`), logs every term and metric, checks one example batch
before any step, keeps frozen teachers out of the optimizer and the checkpoint, and writes the
student artifact (:mod:`kd_lightning.artifact`) into every checkpoint. A method says only what
differs: which models exist (``student_args``, ``teacher_args``), its default objective, and, if
it must, which sources run in a step (:meth:`DistillationModule.forward_knowledge`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.data.batch import (
    TargetGuard,
    batch_size,
    check_loader_not_empty,
    check_targets,
    example_batch,
    normalise_batch,
)
from kd_lightning.features import FeatureCapture
from kd_lightning.methods.checkpoints import StudentArtifactCheckpoints
from kd_lightning.methods.checks import (
    check_class_count,
    check_optimizer,
    check_teacher_cache,
    check_trainer,
    check_vocabulary,
    rng_state,
    set_rng_state,
    untouched,
)
from kd_lightning.methods.forward_errors import explain_forward_failure
from kd_lightning.methods.metrics import KnowledgeMetrics
from kd_lightning.methods.nonfinite import NonFiniteGuard
from kd_lightning.models.from_checkpoint import is_from_checkpoint_spec
from kd_lightning.models.spec import instantiate, model_spec
from kd_lightning.objective import LossTerm, Objective, Progress
from kd_lightning.teachers import CachedTeacher, FrozenTeacher, call_model, output_logits
from kd_lightning.teachers.cached import batch_has_cache

STAGES = ("train", "val", "test")


def default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with learning rate 1e-3: the default of every method (``optimizer=`` replaces it)."""
    return torch.optim.Adam(params, lr=1e-3)


def _knowledge_names(arg: str, value: Any) -> list[str]:
    """Knowledge names of a model argument: ``student`` -> [student]; ``peers`` -> [peer0, ...]."""
    if isinstance(value, (list, tuple, nn.ModuleList)):
        stem = arg[:-1] if arg.endswith("s") else arg
        return [f"{stem}{i}" for i in range(len(value))]
    return [arg]


class DistillationModule(StudentArtifactCheckpoints, L.LightningModule):
    """Base LightningModule of every distillation method.

    Subclasses name their models in class attributes and pass them to ``__init__``; the base
    builds each (an ``nn.Module`` or a ``class_path``/``init_args`` spec), wraps teachers as
    frozen knowledge sources, records the students' specs, and hooks the layers the objective
    reads.

    Args:
        models: ``{argument name: module, spec, list of them, or None}`` for every name in
            ``student_args`` and ``teacher_args``.
        loss_terms: the objective (a list of :class:`~kd_lightning.objective.LossTerm`).
        num_classes: number of classes (or vocabulary size); checked at start-up against the
            data and every model's output. ``None`` takes it from the data or the student.
        optimizer: builds the optimizer from the trainable parameters (students, peers,
            connectors, learnable loss parts); never sees a frozen teacher. Default:
            :func:`default_optimizer`.
        lr_scheduler: builds the scheduler from the optimizer (optional).
    """

    monitor: ClassVar[str] = "val/acc"
    mode: ClassVar[str] = "max"
    student_args: ClassVar[tuple[str, ...]] = ("student",)
    """Init arguments holding trained models; the first is exported as the student."""
    teacher_args: ClassVar[tuple[str, ...]] = ("teacher",)
    """Init arguments holding frozen teachers: not hyperparameters, not in checkpoints, ``None``
    by default in :meth:`load_from_checkpoint`."""
    hparams_ignore: ClassVar[tuple[str, ...]] = ()
    """Further init arguments that hold modules or callables (not plain hyperparameters)."""

    def __init__(
        self,
        models: dict[str, Any],
        loss_terms: list[LossTerm] | None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        ignore = [*models, "models", "loss_terms", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=[*ignore, *self.hparams_ignore])
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model_specs: dict[str, Any] = {}
        self.sources: dict[str, str] = {}  # knowledge name -> attribute path
        for name in self.student_args:
            self._add_model(name, models.get(name), frozen=False)
        for name in self.teacher_args:
            self._add_model(name, models.get(name), frozen=True)
        self.objective = Objective(loss_terms) if loss_terms is not None else None
        self.metrics_service = KnowledgeMetrics()
        self.target_guard = TargetGuard()  # labels of every batch after the example
        self.nonfinite = NonFiniteGuard(also=[self.target_guard])
        self._captures: dict[str, FeatureCapture] = {}
        self._checked = False
        if self.objective is not None:
            self._make_captures()

    # ------------------------------------------------------------------ models
    def _build(self, value: Any, frozen: bool) -> nn.Module | None:
        if value is None:
            return None
        built = instantiate(value) if isinstance(value, dict) else value
        if not isinstance(built, nn.Module):
            raise TypeError(f"expected an nn.Module or a model spec, got {type(value).__name__}")
        if frozen and not hasattr(built, "teach"):
            built = FrozenTeacher(built)
        return built

    def _add_model(self, name: str, value: Any, frozen: bool) -> None:
        if isinstance(value, (list, tuple)):
            built = [self._build(v, frozen) for v in value]
            if len({id(m) for m in built}) != len(built):
                raise ValueError(
                    f"the same module object appears twice in `{name}`: give each its own instance"
                )
            module: nn.Module | None = nn.ModuleList(built)
            specs = [
                v if isinstance(v, dict) else model_spec(m)
                for v, m in zip(value, built, strict=True)
            ]
            names = _knowledge_names(name, value)
            for i, knowledge_name in enumerate(names):
                self.sources[knowledge_name] = f"{name}.{i}"
            if not frozen and all(s is not None for s in specs):
                self.model_specs[name] = specs
        else:
            module = self._build(value, frozen)
            if module is not None:
                self.sources[name] = name
                # A FromCheckpoint spec would read another run's file on reload: record the
                # rebuilt model's own spec, so this run's checkpoints stand alone.
                from_file = isinstance(value, dict) and is_from_checkpoint_spec(value)
                spec = value if isinstance(value, dict) and not from_file else model_spec(module)
                if not frozen and spec is not None:
                    self.model_specs[name] = spec
        setattr(self, name, module)

    def record_model_specs(self, specs: dict[str, Any]) -> None:
        """Record how to rebuild module arguments from their config (the CLI calls it).

        Args:
            specs: ``{argument: class_path/init_args spec (or a list of them)}`` for trained
                models, ``loss_terms`` and the ``hparams_ignore`` arguments; frozen teachers are
                never recorded (they come from their own files).
        """
        for name, spec in specs.items():
            if name not in self.teacher_args and spec is not None:
                self.model_specs[name] = spec

    def source(self, name: str) -> nn.Module | None:
        """The model behind a knowledge name (``student``, ``peer1``, ``teacher``)."""
        path = self.sources.get(name)
        if path is None:
            return None
        module: nn.Module = self
        for part in path.split("."):
            module = module._modules[part]  # not getattr: `student` is also a property
        return module

    @property
    def exported_name(self) -> str:
        """Knowledge name of the model exported as the student (DML overrides it)."""
        return self.student_args[0]

    @property
    def student(self) -> nn.Module:
        """The exported student (same as :attr:`exported`)."""
        return self.exported

    def replace_student(self, module: nn.Module) -> None:
        """Put ``module`` where the exported student is (compression swaps in a pruned or
        fake-quantized copy); hooks, the optimizer and checkpoints then see the new one."""
        parent, _, leaf = self.sources[self.exported_name].rpartition(".")
        owner = self.get_submodule(parent) if parent else self
        owner._modules[leaf] = module
        if self.objective is not None:
            self._make_captures()

    @property
    def exported(self) -> nn.Module:
        """The model exported as the student (prediction, ``load_student``, export)."""
        return self.source(self.exported_name)

    def own_knowledge(self) -> list[str]:
        """Knowledge names the method makes itself (``ensemble``, ``exit0``, ``ema``, ...)."""
        return []

    def knowledge_names(self) -> list[str]:
        """Every knowledge name a loss term may read: the models and :meth:`own_knowledge`."""
        return [*self.sources, *self.own_knowledge()]

    def hooked_layers(self) -> dict[str, list[str]]:
        """Layers to hook per model: those the objective reads (override to add the method's)."""
        names = self.knowledge_names()
        return {m: ls for m, ls in self.objective.layers(names).items() if m in self.sources}

    def _make_captures(self) -> None:
        """Hook the layers of :meth:`hooked_layers` (validated now: a typo fails at once)."""
        for capture in self._captures.values():
            capture.close()  # a compiled model's hooks stay registered until closed
        self._captures = {}
        for model_name, layers in self.hooked_layers().items():
            model = self.source(model_name)
            if model is None:
                continue  # inference-only load without the teacher
            root = model.hook_root if hasattr(model, "hook_root") else model
            self._captures[model_name] = FeatureCapture(root, layers, model_name=model_name)

    # ------------------------------------------------------------------ knowledge
    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits of the exported student: ``(B, C)`` or ``(B, L, V)``."""
        return output_logits(call_model(self.exported, inputs))

    def run_source(
        self, name: str, batch: dict[str, Any], knowledge: dict[str, Any]
    ) -> dict[str, Any]:
        """Run one knowledge source on ``batch``; return its logits and hooked layers by key."""
        model = self.source(name)
        if model is None and name == "teacher" and batch_has_cache(batch):
            model = CachedTeacher()
        if model is None:
            return {}
        capture = self._captures.get(name)
        # Start-up: a forward that fails on the example names the model and the input shape.
        explained = nullcontext() if self._checked else explain_forward_failure(name, model, batch)
        with capture if capture is not None else nullcontext({}) as features, explained:
            if hasattr(model, "teach"):
                out = model.teach(batch, knowledge)
            else:
                out = {"logits": call_model(model, batch["input"])}
        result: dict[str, Any] = {}
        for key, value in out.items():
            if key == "logits":
                result[name] = output_logits(value)
            else:  # "topk" -> "teacher.topk"; "log.<stat>" statistics keep their name
                result[key if key.startswith("log.") else f"{name}.{key}"] = value
        result.update({f"{name}.{k}": v for k, v in features.items()})
        return result

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """The step's knowledge: every trained model, then every teacher (override to choose).

        A ``teacher`` argument left ``None`` still runs when the batch carries cached teacher
        outputs (a :class:`~kd_lightning.teachers.CachedTeacher` stands in).
        """
        owner = {name: path.split(".")[0] for name, path in self.sources.items()}
        trained = [n for n, arg in owner.items() if arg in self.student_args]
        frozen = [n for n, arg in owner.items() if arg in self.teacher_args]
        if "teacher" in self.teacher_args and "teacher" not in frozen:
            frozen.append("teacher")
        knowledge: dict[str, Any] = {}
        for name in [*trained, *frozen]:
            knowledge.update(self.run_source(name, batch, knowledge))
        return knowledge

    def compute_losses(
        self, knowledge: dict[str, Any], batch: dict[str, Any], stage: str
    ) -> dict[str, torch.Tensor]:
        """``{"loss": total, <term name>: value}`` from the objective (override for more)."""
        return self.objective.evaluate(knowledge, batch, self.knowledge_names(), self.progress)

    @property
    def progress(self) -> Progress:
        """Training progress for schedules (epoch 0 outside a trainer)."""
        if self._trainer is None:
            return Progress()
        return Progress(self.current_epoch, self.global_step, self.trainer.max_epochs)

    def metric_sources(self) -> list[str]:
        """Knowledge names that get their own ``<stage>/acc_<name>`` (default: none)."""
        return []

    # ------------------------------------------------------------------ steps
    def shared_step(self, batch: Any, stage: str, batch_idx: int | None = None) -> torch.Tensor:
        batch = normalise_batch(batch)
        if not self._checked:
            self.check_example(batch)
        target = self.target_guard.screen(batch.get("target"), self.num_classes, batch_idx, stage)
        if target is not None:
            batch["target"] = target
        knowledge = self.forward_knowledge(batch, stage)
        losses = self.compute_losses(knowledge, batch, stage)
        self.nonfinite.record(losses, stage, self)  # val/test: read at the evaluation's end
        size = batch_size(batch)
        logged = {
            f"{stage}/loss" if k == "loss" else f"{stage}/loss_{k}": v.detach()
            for k, v in losses.items()
        }
        logged.update({f"{stage}/{k[4:]}": v for k, v in knowledge.items() if k.startswith("log.")})
        total = logged.pop(f"{stage}/loss")
        common = {"on_epoch": True, "batch_size": size, "sync_dist": stage != "train"}
        self.log(f"{stage}/loss", total, on_step=stage == "train", prog_bar=True, **common)
        self.log_dict(logged, on_step=stage == "train", **common)
        self.metrics_service.update(self, stage, knowledge, batch)
        return losses["loss"]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Student class probabilities (float32), ``(B, C)`` or ``(B, L, V)``."""
        batch = normalise_batch(batch)
        return torch.softmax(self(batch["input"]).float(), dim=-1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.nonfinite.maybe_raise(self)

    def on_train_epoch_end(self) -> None:
        self.nonfinite.raise_if_tripped()

    def on_validation_end(self) -> None:
        self.target_guard.raise_if_tripped()  # bad labels recorded on an accelerator
        self.nonfinite.raise_if_evaluation_tripped()

    on_test_end = on_validation_end

    def on_train_start(self) -> None:
        if not self._checked:  # plain DataLoaders: an iterable one may be empty (no length)
            rng = rng_state()
            try:
                check_loader_not_empty(self.trainer.train_dataloader)
            finally:
                set_rng_state(rng)

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`~kd_lightning.callbacks.monitor_check.MonitorCheck`: a monitored metric
        name the run never logs is refused before training (after the sanity check)."""
        from kd_lightning.callbacks.monitor_check import MonitorCheck  # callbacks import methods

        return [MonitorCheck()]

    def on_fit_end(self) -> None:
        # Plain DataLoaders have no example batch: an empty one is only visible here.
        trainer = self.trainer
        if trainer.num_training_batches == 0 and trainer.global_step == 0:
            if trainer.limit_train_batches != 0 and trainer.max_epochs != 0:
                raise ValueError(
                    "the training DataLoader yields no batch, so fit trained nothing and wrote "
                    "no checkpoint: the training set is empty (check the data path, the split "
                    "and any filtering), or drop_last removes the only, incomplete batch (use a "
                    "smaller batch_size)"
                )

    # ------------------------------------------------------------------ start-up checks
    def check_teacher_cache(self, provenance: Any) -> None:
        """Refuse a teacher cache made by another teacher, or stored at a temperature, k or
        selection the objective cannot read (:func:`~kd_lightning.methods.checks.check_teacher_cache`);
        a cache also calls it before building, so a refusal costs no teacher pass."""
        check_teacher_cache(self, provenance)

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_trainer(self.trainer, stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is None:
            self.num_classes = data_classes
        elif data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model is set up for num_classes={self.num_classes} but the data has "
                f"{data_classes} classes; set model.init_args.num_classes to {data_classes} "
                "(the CLI links it from data.num_classes when you leave it out)"
            )
        if datamodule is None:
            return  # plain DataLoaders: the first batch is checked before the first step
        cache = getattr(datamodule, "teacher_cache", None)
        if cache is not None and hasattr(cache, "provenance"):
            self.check_teacher_cache(cache.provenance)
        if stage == "fit" or hasattr(datamodule, "example_batch"):
            # The library's data modules check whole splits at set-up and give 2 samples; any
            # other's whole first training batch is the example (what its loader yields before
            # the first step anyway, so the label hints rest on a batch, not on 2 samples). The
            # dataset is not scanned (a silent pass over every sample); TargetGuard checks the
            # labels of every later batch in its step.
            size = 2 if hasattr(datamodule, "example_batch") else None
            rng = rng_state()  # a shuffling loader draws a seed: the run must not notice
            try:
                example = example_batch(datamodule, size)
            finally:
                set_rng_state(rng)
            self.check_example(example, stage)

    def check_example(self, batch: Any, stage: str = "fit") -> None:
        """Start-up checks on one example batch, before any step; changes no state.

        Checks labels (dtype, range), every model's class count, and runs the objective once so
        that shape mismatches, missing layers and cache settings fail now with a message that
        names the fix. Studies call it for every run before the first one trains.

        Raises:
            ValueError, TypeError: naming the problem and the fix.
        """
        batch = normalise_batch(batch)
        labels_checked = self.num_classes is not None  # else the models tell the class count
        if labels_checked:
            check_targets(batch.get("target"), self.num_classes)
        self.target_guard.expect(batch.get("target"))
        frozen = {n for n, path in self.sources.items() if path.split(".")[0] in self.teacher_args}
        crop = any(getattr(t.loss, "crop_vocab", False) for t in self.objective or [])
        with untouched(self):
            knowledge = self.forward_knowledge(batch, "val")
            reference = None  # the model that told the class count, when nothing else did
            for name in self.sources:
                if name in knowledge:
                    label = f"{name} ({self.sources[name]})" if name != self.sources[name] else name
                    if name in frozen and knowledge[name].dim() == 3 and self.num_classes:
                        check_vocabulary(label, knowledge[name], self.num_classes, crop)
                        continue  # per-token teacher: its vocabulary, cropped when a loss says
                    if self.num_classes is None:
                        reference = label
                    self.num_classes = check_class_count(
                        label, knowledge[name], self.num_classes, reference
                    )
            if not labels_checked:
                check_targets(batch.get("target"), self.num_classes)
            if stage in ("fit", "validate", "test") and self.objective is not None:
                self.check_objective(knowledge, batch)
        if stage == "fit":
            check_optimizer(self)
        if self.num_classes is None:
            raise ValueError("num_classes is unknown: pass num_classes to the method")
        self.metrics_service.configure(self, self.num_classes)
        self._checked = True

    def check_objective(self, knowledge: dict[str, Any], batch: dict[str, Any]) -> None:
        """Run every term once on the example (errors name the term and the shapes)."""
        from kd_lightning.methods.term_errors import explain_term_error

        if self.objective.uses_teacher and "teacher" in self.teacher_args:
            has_teacher = any(k == "teacher" or k.startswith("teacher.") for k in knowledge)
            if not has_teacher:
                raise ValueError(
                    f"{type(self).__name__}'s loss terms need a teacher: set "
                    "model.init_args.teacher (e.g. class_path: "
                    "kd_lightning.teachers.PretrainedTeacher with a checkpoint_path), or attach "
                    "a teacher-output cache to the data"
                )
        names = self.knowledge_names()
        for term in self.objective:
            try:
                term(knowledge, batch, names, self.progress)
            except Exception as err:  # noqa: BLE001 - re-raised with the term and a fix
                raise ValueError(explain_term_error(term, knowledge, names, err)) from err

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (frozen teachers and EMA copies have none)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor},
        }
