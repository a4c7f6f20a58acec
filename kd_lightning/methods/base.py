"""``DistillationModule``: the template every distillation method follows.

The base owns everything methods share: hyperparameters, teacher freezing, one step for
train/val/test, metrics cloned per stage, logging of every loss term, the optimizer over the
trainable parameters only, start-up checks, and checkpoints that keep frozen teachers out.
Subclasses own which models exist (:meth:`forward_models`) and how knowledge is compared
(:meth:`compute_losses`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.functional.soft_target import IGNORE_INDEX
from kd_lightning.metrics import TeacherStudentKL, TopOneAgreement
from kd_lightning.models.spec import instantiate, model_spec
from kd_lightning.teachers import CHECKPOINT_KEY, FrozenTeacher, output_logits

try:  # set by LightningCLI while it instantiates the model: hparams are then the parsed config
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older/newer Lightning without it
    _given_hyperparameters = None

STAGES = ("train", "val", "test")


def _default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _is_unserialisable(value: Any) -> bool:
    if isinstance(value, nn.Module) or (callable(value) and not isinstance(value, type)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_unserialisable(v) for v in value)
    return False


def normalise_batch(batch: Any) -> dict[str, Any]:
    """A transfer-set batch as a dict (``input``, ``target``, ``index``, optional cached teacher outputs).

    A plain ``(x, y)`` tuple from a user's own DataModule is accepted; ``index`` is then absent.
    """
    if isinstance(batch, dict):
        if "input" not in batch:
            raise KeyError(f"a batch dict needs an 'input' entry; got keys {sorted(batch)}")
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"input": batch[0], "target": batch[1]}
    raise TypeError(
        "a batch must be a dict with 'input' and 'target' (see TransferSetDataModule) or an "
        f"(input, target) tuple; got {type(batch).__name__}"
    )


class DistillationModule(L.LightningModule):
    """Base LightningModule of every distillation method.

    Args:
        num_classes: number of classes; checked at start-up against the data and every model's
            output. ``None`` takes it from the datamodule.
        optimizer: builds the optimizer from the trainable parameters (students, connectors,
            learnable loss parts); never sees a frozen teacher. Default: Adam, lr 1e-3.
        lr_scheduler: builds the scheduler from the optimizer (optional).
    """

    monitor: ClassVar[str] = "val/acc"
    mode: ClassVar[str] = "max"
    frozen_model_args: ClassVar[tuple[str, ...]] = ()
    """Init arguments holding frozen teachers: not hyperparameters, not in checkpoints, and
    ``None`` by default in :meth:`load_from_checkpoint` (a distilled student loads without them)."""
    student_arg: ClassVar[str] = "student"
    """Init argument holding the model that is trained and exported."""

    def __init__(
        self,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self._save_hparams(inspect.currentframe().f_back)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._metrics_ready = False

    # ------------------------------------------------------------------ hyperparameters
    def _save_hparams(self, frame) -> None:
        given = _given_hyperparameters.get() if _given_hyperparameters is not None else None
        if given is not None:
            # LightningCLI: hparams are the parsed config (class_path/init_args dicts), which
            # rebuild every model on load; only frozen teachers are left out.
            self.save_hyperparameters(ignore=list(self.frozen_model_args), frame=frame)
            return
        init_args: dict[str, Any] = {}
        for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            init_args.update(local_args)
        ignore = [k for k, v in init_args.items() if _is_unserialisable(v)]
        ignore += list(self.frozen_model_args)
        self.save_hyperparameters(ignore=ignore, frame=frame)
        self._python_init_args = init_args

    def build_model(self, model: nn.Module | dict) -> nn.Module:
        """Accept a module, or a ``class_path``/``init_args`` spec (hparams of a checkpoint)."""
        built = instantiate(model) if isinstance(model, dict) else model
        if not isinstance(built, nn.Module):
            raise TypeError(f"expected an nn.Module or a model spec, got {type(model).__name__}")
        return built

    def record_student_spec(self, student: nn.Module) -> None:
        """Store how to rebuild the student (from the CLI config, or from the zoo model itself)."""
        if self.student_arg not in self.hparams:
            spec = model_spec(student)
            if spec is not None:
                self.hparams[self.student_arg] = spec

    def freeze_teacher(self, teacher: nn.Module | dict | None) -> FrozenTeacher | None:
        if teacher is None:
            return None
        teacher = self.build_model(teacher)
        return teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)

    # ------------------------------------------------------------------ template
    @property
    def student(self) -> nn.Module:
        return self._student_module

    @student.setter
    def student(self, module: nn.Module) -> None:
        self._student_module = module

    def forward(self, x: Any) -> torch.Tensor:
        """Student logits."""
        return output_logits(self.student(x))

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run the models; return at least ``{"student": logits}`` and ``"teacher"`` (logits or None)."""
        raise NotImplementedError

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, <term>: value, ...}``."""
        raise NotImplementedError

    def validate_setup(self, example: dict[str, Any]) -> None:
        """Start-up checks of a subclass, run on an example batch before any training step."""

    # ------------------------------------------------------------------ metrics
    def configure_metrics(self, num_classes: int) -> None:
        student = MetricCollection(
            {"acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)}
        )
        teacher = MetricCollection({"agreement": TopOneAgreement(), "kl": TeacherStudentKL()})
        # ModuleDict keys cannot be "train" (an nn.Module method), hence the "_metrics" suffix.
        self.student_metrics = nn.ModuleDict(
            {f"{s}_metrics": student.clone(prefix=f"{s}/") for s in STAGES}
        )
        self.teacher_metrics = nn.ModuleDict(
            {f"{s}_metrics": teacher.clone(prefix=f"{s}/") for s in STAGES}
        )
        self._metrics_ready = True

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        metrics = self.student_metrics[f"{stage}_metrics"]
        metrics.update(student.detach(), target)
        self.log_dict(metrics, on_step=False, on_epoch=True)
        if teacher is not None:
            teacher_metrics = self.teacher_metrics[f"{stage}_metrics"]
            teacher_metrics.update(student.detach(), teacher.detach())
            self.log_dict(teacher_metrics, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ steps
    def shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        batch = normalise_batch(batch)
        outputs = self.forward_models(batch)
        losses = self.compute_losses(outputs, batch)
        batch_size = batch["target"].shape[0]
        logged = {
            f"{stage}/loss" if k == "loss" else f"{stage}/loss_{k}": v.detach()
            for k, v in losses.items()
        }
        self.log_dict(
            logged,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=stage != "train",
            prog_bar=False,
        )
        self.log_metrics(stage, outputs["student"], outputs.get("teacher"), batch["target"])
        return losses["loss"]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Student class probabilities (float32)."""
        batch = normalise_batch(batch)
        return torch.softmax(self(batch["input"]).float(), dim=-1)

    # ------------------------------------------------------------------ start-up checks
    def setup(self, stage: str) -> None:
        datamodule = (
            getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        )
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is None:
            self.num_classes = data_classes
        elif data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model is set up for num_classes={self.num_classes} but the data has "
                f"{data_classes} classes; set model.init_args.num_classes to {data_classes} "
                "(the CLI links it from data.num_classes when you leave it out)"
            )
        example = datamodule.example_batch() if hasattr(datamodule, "example_batch") else None
        if example is not None:
            self._check_class_counts(example)
            if stage != "predict":  # prediction needs the student only
                self.validate_setup(example)
        if self.num_classes is None:
            raise ValueError(
                "num_classes is unknown: pass num_classes to the method or use a TransferSetDataModule"
            )
        if not self._metrics_ready:
            self.configure_metrics(self.num_classes)

    @torch.no_grad()
    def _check_class_counts(self, example: dict[str, Any]) -> None:
        for name, model in self.named_output_models():
            was_training = model.training
            model.eval()  # a dry run must not touch BatchNorm statistics
            try:
                logits = output_logits(model(example["input"]))
            finally:
                model.train(was_training)
            classes = logits.shape[-1]
            if self.num_classes is None:
                self.num_classes = classes
            if classes != self.num_classes:
                raise ValueError(
                    f"the {name} outputs {classes} logits but the task has {self.num_classes} "
                    f"classes; build the {name} with num_classes={self.num_classes} (or use a "
                    f"{name} checkpoint trained on this data)"
                )

    def named_output_models(self) -> list[tuple[str, nn.Module]]:
        """Every model whose logits must have ``num_classes`` entries (student, teachers, peers)."""
        return [("student", self.student)]

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
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

    # ------------------------------------------------------------------ checkpoints
    def frozen_prefixes(self) -> list[str]:
        return [
            f"{name}."
            for name, module in self.named_modules()
            if name and isinstance(module, FrozenTeacher)
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = tuple(self.frozen_prefixes())
        if prefixes:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)
            }
        spec = self.hparams.get(self.student_arg)
        checkpoint[CHECKPOINT_KEY] = {
            "student_spec": spec if isinstance(spec, dict) else model_spec(self.student),
            "num_classes": self.num_classes,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen teachers come from their own source, not from this checkpoint: put their
        # current weights back so strict loading (of the student and everything trained) holds.
        prefixes = tuple(self.frozen_prefixes())
        if prefixes:
            own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
            checkpoint["state_dict"].update(own)
        # A pruned checkpoint stores weight_orig + weight_mask: install the same pruning
        # parametrisation so the state loads without the pruning callback.
        from kd_lightning.callbacks.pruning import install_pruning_for_state_dict

        install_pruning_for_state_dict(self, checkpoint["state_dict"])

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs
    ):
        """Load a trained method; frozen teachers default to ``None`` so the student loads alone."""
        for name in cls.frozen_model_args:
            kwargs.setdefault(name, None)
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            **kwargs,
        )
