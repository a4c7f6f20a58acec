"""Progressive distillation through teacher assistants, stage by stage inside one ``fit``.

Mirzadeh et al. (2020), "Improved Knowledge Distillation via Teacher Assistant" (TAKD): when
the gap between teacher and student is large, distil the teacher into an intermediate-size
assistant first, then the assistant into the student (or through several assistants). With the
chain ``teacher -> assistants[0] -> ... -> student``, stage k trains model k+1 from the frozen
model k for ``stage_epochs[k]`` epochs with the loss terms (default: Hinton's objective).

The objective is a list of :class:`~kd_lightning.objective.LossTerm` over two knowledge names
that every stage fills: ``trainee`` (the logits of the model this stage trains) and
``stage_teacher`` (the logits of its frozen teacher: the original teacher, or the assistant
trained in the stage before). A term sees the progress of its own stage (epochs counted from
the stage's start, ``max_epochs`` = that stage's epochs), so warm-ups and ``pretrain_epochs``
restart with every stage, as in the paper, where each stage is a training run of its own.

How the stages run in one ``fit``:

- The stage of an epoch is a function of the epoch number alone (cumulative ``stage_epochs``),
  so a run resumed at any epoch continues the stage it was in.
- Only the model of the current stage has ``requires_grad=True``; at a stage boundary (in
  ``on_train_epoch_start``) the trained model is frozen in place and becomes the next teacher
  (it runs in eval mode, without autograd), and a fresh optimizer (and scheduler) for the next
  model is built with ``trainer.strategy.setup_optimizers(trainer)``: the documented way to
  re-run ``configure_optimizers``. That keeps automatic optimization (gradient accumulation,
  clipping, AMP) working.
- Under DDP the module is wrapped again at each boundary (``DDPStrategy.configure_ddp``):
  DDP reduces the gradients of the parameters that required grad when it was built, so without
  a new wrapper the next model would train apart on every rank. Other multi-process
  strategies (FSDP, DeepSpeed: they shard at setup) are refused at start-up.
- The checkpoint records the stage whose optimizer it holds and keeps every trained model
  (assistants and student); the original teacher stays out of it (a
  :class:`~kd_lightning.teachers.FrozenTeacher` reloaded from its own checkpoint).
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd_lightning.artifact import CHECKPOINT_KEY
from kd_lightning.data.batch import normalise_batch
from kd_lightning.features import _eval_mode
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.checks import check_class_count, untouched
from kd_lightning.objective import LossTerm, Progress
from kd_lightning.validation import fraction, positive

TRAINEE = "trainee"
"""Knowledge name of the logits of the model the current stage trains."""
STAGE_TEACHER = "stage_teacher"
"""Knowledge name of the logits of the current stage's frozen teacher."""


def takd_loss_terms(temperature: float = 4.0, alpha: float = 0.9) -> list[LossTerm]:
    """Hinton's objective for every stage: ``alpha * T^2 KL(stage_teacher || trainee) +
    (1 - alpha) * CE(trainee)``, as terms ``kd`` and ``ce``.

    Raises:
        ValueError: ``alpha`` outside [0, 1] or a temperature that is not > 0.
    """
    alpha = fraction("alpha", alpha)
    temperature = positive("temperature", temperature, "Use e.g. temperature: 4.0")
    terms = []
    if alpha > 0:
        terms.append(LossTerm(SoftTargetKLLoss(temperature), weight=alpha, name="kd",
                              student=TRAINEE, teacher=STAGE_TEACHER))  # fmt: skip
    if alpha < 1:
        terms.append(
            LossTerm(HardLabelCrossEntropy(), weight=1 - alpha, name="ce", student=TRAINEE)
        )
    return terms


class ProgressiveDistillation(DistillationModule):
    """Teacher -> assistant(s) -> student, one stage after the other in a single ``fit``.

    Knowledge of a step: ``trainee`` and ``stage_teacher`` (what the loss terms read), the same
    tensors under the models' own names (``assistant0``, ``student``, ``teacher``) and under
    ``stage<k>`` (k = 1, 2, ...: the model trained in stage k). In validation and test the
    final ``student`` and the original ``teacher`` also run at every stage, so ``val/acc``,
    ``val/agreement`` and ``val/kl`` always describe the exported student (and its agreement
    with the original teacher), whichever model is training. Logs ``{stage}/acc_stage<k>`` for
    the model trained in stage k during that stage. ``trainer.max_epochs`` must equal
    ``sum(stage_epochs)``.

    Args:
        student: the final, smallest model (exported as the student).
        teacher: the frozen original teacher (e.g.
            :class:`~kd_lightning.teachers.PretrainedTeacher`), or ``None`` with a teacher
            cache (stage 1 reads it) or for inference after :meth:`load_from_checkpoint`.
        assistants: intermediate models, largest first; every model must output
            ``num_classes`` logits (checked at start-up, naming the one that disagrees).
        stage_epochs: epochs of each stage, ``len(assistants) + 1`` entries.
        loss_terms: the objective of every stage over ``trainee`` and ``stage_teacher``
            (replaces the default; then leave ``temperature`` and ``alpha`` unset).
        temperature: T of the default soft-target term; default 4.
        alpha: weight of the default soft-target term (``1 - alpha`` on the labels); default 0.9.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory, called once per stage with that stage's model.
        lr_scheduler: scheduler factory, called once per stage.
    """

    student_args = ("student", "assistants")
    teacher_args = ("teacher",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        assistants: list[nn.Module] | None = None,
        stage_epochs: list[int] | None = None,
        loss_terms: list[LossTerm] | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        assistants = list(assistants or [])
        stages = len(assistants) + 1
        if stage_epochs is None:
            raise ValueError(
                f"stage_epochs is required: {stages} numbers (one per stage: teacher -> "
                f"{len(assistants)} assistant(s) -> student), e.g. {[10] * stages}"
            )
        if len(stage_epochs) != stages or any(int(e) != e or e < 1 for e in stage_epochs):
            raise ValueError(
                f"stage_epochs must list {stages} positive epoch counts (one per stage: "
                f"{len(assistants)} assistant(s) + the student), got {list(stage_epochs)}"
            )
        if loss_terms is None:
            loss_terms = takd_loss_terms(
                4.0 if temperature is None else temperature, 0.9 if alpha is None else alpha
            )
        elif temperature is not None or alpha is not None:
            raise ValueError(
                "temperature and alpha only build the default objective, and loss_terms "
                "replaces it: set the temperature and weights on your loss terms and leave "
                "temperature and alpha unset"
            )
        _check_terms(loss_terms, [int(e) for e in stage_epochs])
        super().__init__(
            models={"student": student, "teacher": teacher, "assistants": assistants},
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        self.stage_epochs = [int(e) for e in stage_epochs]
        self.stage = 0  # the stage whose model trains (the only one with gradients)
        self.set_stage(0)

    # ------------------------------------------------------------------ the chain
    @property
    def num_stages(self) -> int:
        return len(self.stage_epochs)

    def trainee_name(self, stage: int) -> str:
        """Knowledge name of the model trained in ``stage``."""
        return f"assistant{stage}" if stage < len(self.assistants) else "student"

    def stage_teacher_name(self, stage: int) -> str:
        """Knowledge name of the frozen model that teaches in ``stage``."""
        return "teacher" if stage == 0 else self.trainee_name(stage - 1)

    def trainee(self, stage: int) -> nn.Module:
        """The model trained in ``stage``."""
        return self.source(self.trainee_name(stage))

    def stage_of_epoch(self, epoch: int) -> int:
        for stage, end in enumerate(itertools.accumulate(self.stage_epochs)):
            if epoch < end:
                return stage
        return self.num_stages - 1

    def set_stage(self, stage: int) -> None:
        """Give gradients to the model of ``stage`` only (the optimizer is rebuilt by the caller)."""
        self.stage = stage
        for k in range(self.num_stages):
            for parameter in self.trainee(k).parameters():
                parameter.requires_grad_(k == stage)

    def knowledge_names(self) -> list[str]:
        """Every knowledge name a loss term may read (the terms read ``trainee``/``stage_teacher``)."""
        return [*self.sources, TRAINEE, STAGE_TEACHER]

    @property
    def progress(self) -> Progress:
        """The progress within the current stage (epoch from the stage's start)."""
        run = super().progress
        start = sum(self.stage_epochs[: self.stage])
        return Progress(max(0, run.epoch - start), run.step, self.stage_epochs[self.stage])

    # ------------------------------------------------------------------ knowledge
    def _run_frozen(self, name: str, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict:
        model = self.source(name)
        with torch.no_grad(), _eval_mode(model) if model is not None else nullcontext():
            return self.run_source(name, batch, knowledge)

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        trainee, teacher = self.trainee_name(self.stage), self.stage_teacher_name(self.stage)
        knowledge = self.run_source(trainee, batch, {})
        knowledge[TRAINEE] = knowledge[f"stage{self.stage + 1}"] = knowledge[trainee]
        knowledge.update(self._run_frozen(teacher, batch, knowledge))
        if teacher in knowledge:
            knowledge[STAGE_TEACHER] = knowledge[teacher]
        if stage != "train":  # the exported student (and the original teacher) at every stage
            for name in ("student", "teacher"):
                if name not in knowledge:
                    knowledge.update(self._run_frozen(name, batch, knowledge))
        return knowledge

    def metric_sources(self) -> list[str]:
        return [f"stage{k + 1}" for k in range(self.num_stages)]

    # ------------------------------------------------------------------ start-up
    def setup(self, stage: str) -> None:
        if stage == "fit":
            total = sum(self.stage_epochs)
            if self.trainer.max_epochs != total and not self.trainer.fast_dev_run:
                raise ValueError(
                    f"ProgressiveDistillation runs its stages {self.stage_epochs} inside one fit: "
                    f"set trainer.max_epochs to {total} (the sum of stage_epochs), got "
                    f"{self.trainer.max_epochs}"
                )
            strategy = self.trainer.strategy
            rewrappable = isinstance(strategy, DDPStrategy) and not isinstance(
                strategy, DeepSpeedStrategy
            )
            if self.trainer.world_size > 1 and not rewrappable:
                raise ValueError(
                    f"ProgressiveDistillation changes the trained model at every stage; "
                    f"{type(strategy).__name__} sets up gradient synchronisation and optimizer "
                    "state once, so the next stage's model would not train correctly on "
                    f"{self.trainer.world_size} processes: use strategy: ddp (the module wraps "
                    "DDP again at each stage) or a single device"
                )
        super().setup(stage)

    def check_example(self, batch: Any, stage: str = "fit") -> None:
        # Every model of the chain, not only the current stage's, before any step.
        batch = normalise_batch(batch)
        with untouched(self):
            classes = self.num_classes
            for k in range(self.num_stages):
                name = self.trainee_name(k)
                logits = self.run_source(name, batch, {})[name]
                classes = check_class_count(f"{name} ({self.sources[name]})", logits, classes)
        super().check_example(batch, stage)

    def check_objective(self, knowledge: dict[str, Any], batch: dict[str, Any]) -> None:
        if self.objective.uses_teacher and STAGE_TEACHER not in knowledge:
            raise ValueError(
                "ProgressiveDistillation's first stage needs the original teacher: set "
                "model.init_args.teacher (e.g. class_path: "
                "kd_lightning.teachers.PretrainedTeacher with a checkpoint_path), or attach a "
                "teacher-output cache to the data"
            )
        super().check_objective(knowledge, batch)

    # ------------------------------------------------------------------ stage switching
    def on_train_epoch_start(self) -> None:
        stage = self.stage_of_epoch(self.current_epoch)
        if stage == self.stage:
            return
        self.set_stage(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(
            strategy.model, DistributedDataParallel
        ):
            # DDP registered the previous stage's parameters only: wrap the module again.
            strategy.model = self
            strategy.configure_ddp()
        # A fresh optimizer (and scheduler) over the new stage's model only.
        strategy.setup_optimizers(self.trainer)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["stage"] = self.stage
        checkpoint[CHECKPOINT_KEY]["stage_epochs"] = list(self.stage_epochs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        record = checkpoint.get(CHECKPOINT_KEY, {})
        saved = record.get("stage_epochs")
        if saved is not None and list(saved) != self.stage_epochs:
            raise ValueError(
                f"the checkpoint was written with stage_epochs {saved}, this module has "
                f"{self.stage_epochs}: resume with the same stage_epochs"
            )
        # Before configure_optimizers on resume: the optimizer state in the checkpoint belongs
        # to this stage's model.
        self.set_stage(int(record.get("stage", self.num_stages - 1)))


def _check_terms(terms: list[LossTerm], stage_epochs: list[int]) -> None:
    """Terms read ``trainee``/``stage_teacher`` only, and each stage leaves every term an epoch."""
    names = [TRAINEE, STAGE_TEACHER]
    for term in terms:
        wrong = [k for k in term.keys("student", names) if k != TRAINEE]
        wrong += [k for k in term.keys("teacher", names) if k != STAGE_TEACHER]
        if wrong:
            raise ValueError(
                f"loss term {term.name!r} reads {wrong}: ProgressiveDistillation's terms compare "
                f"the logits of the stage's model with its teacher's; set `student: {TRAINEE}` "
                f"and `teacher: {STAGE_TEACHER}` on the term (hooked layers are not supported: "
                "the models of a chain differ)"
            )
    first = max((t.pretrain_epochs for t in terms), default=0)
    if first and any(t.pretrain_epochs == 0 for t in terms) and first >= min(stage_epochs):
        raise ValueError(
            f"a loss term has pretrain_epochs={first}, which restarts with every stage; the "
            f"stage of {min(stage_epochs)} epochs (stage_epochs {stage_epochs}) would never "
            "train the other terms: make pretrain_epochs smaller than every stage"
        )
