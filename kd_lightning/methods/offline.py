"""``OfflineDistillation``: frozen, pre-trained teacher(s) teach a student.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": the student
minimises a weighted sum of loss terms (soft targets at temperature T with the T^2 factor, the
hard-label cross-entropy, logit matching, ...). Each term is a :class:`LossTerm`.

Several teachers (You et al. 2017, "Learning from Multiple Teacher Networks") are combined per
sample into one set of teacher logits (mean, fixed, confidence or entropy weights) and may be
*purified*: a teacher that is wrong or unsure on a sample is dropped from that sample's
combination (see :mod:`kd_lightning.functional.ensemble`). Born-Again networks (Furlanello et
al. 2018) are offline distillation from the previous generation: :class:`BornAgain`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.own_knowledge import refuse_ignored
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import FrozenTeacher, TeacherEnsemble
from kd_lightning.validation import fraction, positive


def hinton_loss_terms(temperature: float = 4.0, alpha: float = 0.9) -> list[LossTerm]:
    """The classic objective: ``alpha * T^2 KL + (1 - alpha) * CE`` (CRD's CIFAR protocol: 0.9 / 0.1).

    Raises:
        ValueError: ``alpha`` outside [0, 1] or a temperature that is not > 0.
    """
    alpha = fraction("alpha", alpha)
    temperature = positive("temperature", temperature, "Use e.g. temperature: 4.0")
    terms = []
    if alpha > 0:
        terms.append(LossTerm(SoftTargetKLLoss(temperature), weight=alpha, name="kd"))
    if alpha < 1:
        terms.append(LossTerm(HardLabelCrossEntropy(), weight=1 - alpha, name="ce"))
    return terms


class OfflineDistillation(DistillationModule):
    """Distil a frozen teacher (or an ensemble, or a cache) into a student with loss terms.

    The teacher is frozen on arrival (eval mode that ``.train()`` cannot undo, no gradients, out
    of the optimizer and out of the checkpoint). If the batch carries cached teacher outputs (the
    teacher cache), no teacher is run. Several teachers are one
    :class:`~kd_lightning.teachers.TeacherEnsemble` (weighting and knowledge purification);
    ``teachers=[...]`` is a shorthand for ``teacher=TeacherEnsemble(teachers=[...])``.

    Args:
        student: the network to train.
        teacher: the frozen teacher (e.g. :class:`~kd_lightning.teachers.PretrainedTeacher` or a
            :class:`~kd_lightning.teachers.TeacherEnsemble`). ``None`` is only valid for
            inference after :meth:`load_from_checkpoint`, or with a teacher cache.
        loss_terms: the objective; default: ``temperature``/``alpha`` Hinton terms.
        teachers: several teachers, combined with the mean of their logits (use
            ``teacher: TeacherEnsemble`` for weighting and purification).
        temperature: temperature of the default soft-target term (unset: 4.0). Only for the
            default objective: refused beside ``loss_terms`` (set it on your terms).
        alpha: weight of the default soft-target term (``1 - alpha`` on the hard labels;
            unset: 0.9). Only for the default objective, like ``temperature``.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (sees student, connectors and learnable loss parts only).
        lr_scheduler: scheduler factory.
    """

    hparams_ignore = ("teachers",)
    objective_args: tuple[str, ...] = ("temperature", "alpha")
    """Arguments that only build the default objective: refused beside ``loss_terms``, and left
    out when a checkpoint that recorded its loss terms is reloaded (they never acted there)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        loss_terms: list[LossTerm] | None = None,
        teachers: list[nn.Module] | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if teacher is not None and teachers:
            raise ValueError(
                "give either `teacher` (one, or a TeacherEnsemble) or `teachers` (a list), not both"
            )
        if teachers is not None:
            if len(teachers) == 0:
                raise ValueError("`teachers` is an empty list: give at least one teacher")
            teacher = TeacherEnsemble(teachers)
        refuse_ignored({"temperature": temperature, "alpha": alpha}, loss_terms)
        if loss_terms is None:
            loss_terms = hinton_loss_terms(
                4.0 if temperature is None else temperature, 0.9 if alpha is None else alpha
            )
        super().__init__(
            models={"student": student, "teacher": teacher},
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )


def _architecture(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(module, FrozenTeacher):
        module = module.module
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


class BornAgain(OfflineDistillation):
    """Born-Again networks (Furlanello et al. 2018): generation k+1 learns from generation k.

    Offline distillation whose teacher is the previous generation of the *same* architecture
    (checked at start-up: parameter names and shapes must match). Generation 0 is the network
    trained on labels (:class:`~kd_lightning.methods.Supervised`); each further generation is
    one run of this class with ``teacher: PretrainedTeacher(checkpoint_path=<previous run>)``,
    chained in a study with ``needs`` (see ``experiments/digits/study.yaml``). The paper's
    objective is the KL to the teacher alone; the default here is ``alpha * T^2 KL + (1 - alpha)
    * CE`` with ``temperature=1, alpha=1`` (the paper's), and loss_terms can replace it.

    Args:
        student: the new generation (freshly initialised).
        teacher: the previous generation, frozen.
        temperature: soft-target temperature of the default objective (unset: 1.0); refused
            beside ``loss_terms``.
        alpha: weight of the soft-target term (1 - alpha goes to the hard labels; unset: 1.0);
            refused beside ``loss_terms``.
        loss_terms: replaces the default objective when given.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        refuse_ignored({"temperature": temperature, "alpha": alpha}, loss_terms)
        if loss_terms is None:
            loss_terms = hinton_loss_terms(
                1.0 if temperature is None else temperature, 1.0 if alpha is None else alpha
            )
        super().__init__(
            student=student,
            teacher=teacher,
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )

    def check_example(self, batch: Any, stage: str = "fit") -> None:
        if self.teacher is not None and _architecture(self.teacher) != _architecture(self.student):
            raise ValueError(
                "BornAgain needs a teacher of the student's own architecture (the previous "
                f"generation): the teacher is a {type(self.teacher.module).__name__} with other "
                f"parameter shapes than the student ({type(self.student).__name__}); use the "
                "same model config for both, or OfflineDistillation for a different teacher"
            )
        super().check_example(batch, stage)
