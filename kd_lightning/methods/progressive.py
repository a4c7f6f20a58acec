"""Progressive distillation through teacher assistants, stage by stage inside one ``fit``.

Mirzadeh et al. (2020), "Improved Knowledge Distillation via Teacher Assistant" (TAKD): when
the gap between teacher and student is large, distil the teacher into an intermediate-size
assistant first, then the assistant into the student (or through several assistants). With the
chain ``teacher -> assistants[0] -> ... -> student``, stage k trains model k+1 from the frozen
model k for ``stage_epochs[k]`` epochs with the loss terms (default: Hinton's objective).

How the stages run in one ``fit``:

- The stage of an epoch is a function of the epoch number alone (cumulative ``stage_epochs``),
  so a run resumed at any epoch continues the stage it was in.
- Only the model of the current stage has ``requires_grad=True``; at a stage boundary (in
  ``on_train_epoch_start``) the trained model is frozen in place and becomes the next teacher
  (it runs in eval mode, without autograd), and a fresh optimizer (and scheduler) for the next
  model is built with ``trainer.strategy.setup_optimizers(trainer)``: the documented way to
  re-run ``configure_optimizers``. That keeps automatic optimization (gradient accumulation,
  clipping, AMP) working; it suits single-device and DDP strategies, not ones that shard
  optimizer state at setup (DeepSpeed, FSDP).
- The checkpoint records the stage whose optimizer it holds and keeps every trained model
  (assistants and student); the original teacher stays out of it (a
  :class:`~kd_lightning.teachers.FrozenTeacher` reloaded from its own checkpoint).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.features import _eval_mode
from kd_lightning.methods.base import DistillationModule, _default_optimizer
from kd_lightning.methods.loss_term import LOGITS, LossTerm
from kd_lightning.methods.offline import hinton_loss_terms
from kd_lightning.methods.online import log_accuracy, make_accuracies
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import CHECKPOINT_KEY, output_logits


class ProgressiveDistillation(DistillationModule):
    """Teacher -> assistant(s) -> student, one stage after the other in a single ``fit``.

    Logs ``{stage}/acc_stage<k>`` (k = 1, 2, ...: the model trained in stage k, logged during
    that stage), ``{stage}/agreement`` and ``{stage}/kl`` between that model and its teacher,
    and ``{stage}/acc`` for the final student (in validation and test at every stage, so
    ``val/acc`` always describes the exported model). ``trainer.max_epochs`` must equal
    ``sum(stage_epochs)``.

    Args:
        student: the final, smallest model (exported as ``student.*``).
        teacher: the frozen original teacher (e.g.
            :class:`~kd_lightning.teachers.PretrainedTeacher`); ``None`` only for inference
            after :meth:`load_from_checkpoint`.
        assistants: intermediate models, largest first; every model must output
            ``num_classes`` logits (checked at start-up, naming the one that disagrees).
        stage_epochs: epochs of each stage, ``len(assistants) + 1`` entries.
        loss_terms: the objective of every stage, on logits (default: Hinton's T=4, 0.9 KD +
            0.1 CE).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory, called once per stage with that stage's model.
        lr_scheduler: scheduler factory, called once per stage.
    """

    frozen_model_args = ("teacher",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        assistants: list[nn.Module] | None = None,
        stage_epochs: list[int] | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.student = self.build_model(student)
        self.record_student_spec(self.student)
        self.teacher = self.freeze_teacher(teacher)
        self.assistants = nn.ModuleList([self.build_model(a) for a in assistants or []])
        if "assistants" not in self.hparams:  # built in Python: record how to rebuild them
            specs = [model_spec(a) for a in self.assistants]
            if all(s is not None for s in specs):
                self.hparams["assistants"] = specs
        stages = len(self.assistants) + 1
        if stage_epochs is None:
            raise ValueError(
                f"stage_epochs is required: {stages} numbers (one per stage: teacher -> "
                f"{len(self.assistants)} assistant(s) -> student), e.g. {[10] * stages}"
            )
        if len(stage_epochs) != stages or any(int(e) < 1 for e in stage_epochs):
            raise ValueError(
                f"stage_epochs must list {stages} positive epoch counts (one per stage: "
                f"{len(self.assistants)} assistant(s) + the student), got {list(stage_epochs)}"
            )
        self.stage_epochs = [int(e) for e in stage_epochs]
        terms = loss_terms if loss_terms is not None else hinton_loss_terms()
        if not terms:
            raise ValueError("loss_terms is empty: give at least one LossTerm")
        layered = [t.name for t in terms if t.layer_names("student") or t.layer_names("teacher")]
        if layered:
            raise ValueError(
                f"ProgressiveDistillation compares logits only; terms {layered} read hooked "
                "layers: set their student/teacher sources to 'logits'"
            )
        self.loss_terms = nn.ModuleList(terms)
        self._stage = 0
        self._set_stage(0)
        self._step_outputs: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the chain
    @property
    def num_stages(self) -> int:
        return len(self.stage_epochs)

    @property
    def stage(self) -> int:
        """Index (0-based) of the stage whose model is being trained."""
        return self._stage

    def trainee(self, stage: int) -> nn.Module:
        """The model trained in ``stage``."""
        return self.assistants[stage] if stage < len(self.assistants) else self.student

    def stage_teacher(self, stage: int) -> nn.Module | None:
        """The frozen model that teaches in ``stage``."""
        return self.teacher if stage == 0 else self.trainee(stage - 1)

    def stage_of_epoch(self, epoch: int) -> int:
        for stage, end in enumerate(itertools.accumulate(self.stage_epochs)):
            if epoch < end:
                return stage
        return self.num_stages - 1

    def _set_stage(self, stage: int) -> None:
        self._stage = stage
        for k in range(self.num_stages):
            for parameter in self.trainee(k).parameters():
                parameter.requires_grad_(k == stage)

    def named_output_models(self) -> list[tuple[str, nn.Module]]:
        models: list[tuple[str, nn.Module]] = []
        if self.teacher is not None:
            models.append(("teacher", self.teacher))
        models += [(f"assistant {i} (assistants.{i})", a) for i, a in enumerate(self.assistants)]
        models.append(("student", self.student))
        return models

    # ------------------------------------------------------------------ start-up
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        total = sum(self.stage_epochs)
        if self.trainer.max_epochs != total and not self.trainer.fast_dev_run:
            raise ValueError(
                f"ProgressiveDistillation runs its stages {self.stage_epochs} inside one fit: set "
                f"trainer.max_epochs to {total} (the sum of stage_epochs), got "
                f"{self.trainer.max_epochs}"
            )
        if self.teacher is None:
            raise ValueError(
                "ProgressiveDistillation needs the original teacher to train: set "
                "model.init_args.teacher (e.g. a kd_lightning.teachers.PretrainedTeacher)"
            )

    def configure_metrics(self, num_classes: int) -> None:
        super().configure_metrics(num_classes)
        names = [f"stage{k + 1}" for k in range(self.num_stages)]
        self.stage_metrics = make_accuracies(names, num_classes)

    # ------------------------------------------------------------------ stage switching
    def on_train_epoch_start(self) -> None:
        stage = self.stage_of_epoch(self.current_epoch)
        if stage != self._stage:
            self._set_stage(stage)
            # A fresh optimizer (and scheduler) over the new stage's model only.
            self.trainer.strategy.setup_optimizers(self.trainer)

    # ------------------------------------------------------------------ steps
    def _teacher_logits(self, model: nn.Module | None, x: Any) -> torch.Tensor | None:
        if model is None:
            return None
        with torch.no_grad(), _eval_mode(model):
            return output_logits(model(x))

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch["input"]
        trainee = self.trainee(self._stage)
        trained = output_logits(trainee(x))
        teacher = self._teacher_logits(self.stage_teacher(self._stage), x)
        if trainee is self.student:
            student = trained
        elif not self.training:  # the final student is evaluated at every stage
            student = output_logits(self.student(x))
        else:  # training an assistant: running the student would touch its BatchNorm statistics
            student = None
        outputs = {"student": student, "teacher": teacher, "trained": trained}
        self._step_outputs = outputs
        return outputs

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        trained, teacher = outputs["trained"], outputs["teacher"]
        knowledge_s = {LOGITS: trained}
        knowledge_t = None if teacher is None else {LOGITS: teacher}
        losses: dict[str, torch.Tensor] = {}
        total = trained.new_zeros((), dtype=torch.float32)
        for term in self.loss_terms:
            if term.uses_teacher and knowledge_t is None:
                continue  # inference-only load without the original teacher
            value = term(knowledge_s, knowledge_t, batch.get("target"), batch.get("index"))
            losses[term.name] = value
            total = total + term.scale(self.current_epoch) * value
        losses["loss"] = total
        return losses

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        outputs, self._step_outputs = self._step_outputs, None
        if student is not None:
            super().log_metrics(stage, student, None, target)
        if outputs is None:
            return
        trained = outputs["trained"]
        log_accuracy(self, self.stage_metrics, stage, f"stage{self._stage + 1}", trained, target)
        if teacher is not None:
            teacher_metrics = self.teacher_metrics[f"{stage}_metrics"]
            teacher_metrics.update(trained.detach(), teacher.detach())
            self.log_dict(teacher_metrics, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["stage"] = self._stage
        checkpoint[CHECKPOINT_KEY]["stage_epochs"] = list(self.stage_epochs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        saved = meta.get("stage_epochs")
        if saved is not None and list(saved) != self.stage_epochs:
            raise ValueError(
                f"the checkpoint was written with stage_epochs {saved}, this module has "
                f"{self.stage_epochs}: resume with the same stage_epochs"
            )
        # Before configure_optimizers on resume: the optimizer state in the checkpoint belongs
        # to this stage's model.
        self._set_stage(int(meta.get("stage", self.num_stages - 1)))
