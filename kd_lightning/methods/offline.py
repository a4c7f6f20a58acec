"""``OfflineDistillation``: a frozen, pre-trained teacher teaches a student.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": the student
minimises a weighted sum of loss terms (soft targets at temperature T with the T^2 factor, the
hard-label cross-entropy, logit matching, ...). Each term is a :class:`LossTerm`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.connectors import suggest_connector
from kd_lightning.features import FeatureCapture, _eval_mode
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.base import DistillationModule, _default_optimizer
from kd_lightning.methods.loss_term import LOGITS, LossTerm
from kd_lightning.teachers import output_logits


def _layers(terms: list[LossTerm], side: str) -> list[str]:
    names: list[str] = []
    for term in terms:
        names += [n for n in term.layer_names(side) if n not in names]
    return names


def hinton_loss_terms(temperature: float = 4.0, alpha: float = 0.9) -> list[LossTerm]:
    """The classic objective: ``alpha * T^2 KL + (1 - alpha) * CE`` (CRD's CIFAR protocol: 0.9 / 0.1)."""
    return [
        LossTerm(SoftTargetKLLoss(temperature), weight=alpha, name="kd"),
        LossTerm(HardLabelCrossEntropy(), weight=1 - alpha, name="ce"),
    ]


class OfflineDistillation(DistillationModule):
    """Distil a frozen teacher into a student with a weighted list of loss terms.

    The teacher is frozen on arrival (eval mode that ``.train()`` cannot undo, no gradients, out
    of the optimizer and out of the checkpoint). If the batch carries precomputed
    ``teacher_logits`` (a teacher-output cache), the teacher is not run.

    Args:
        student: the network to train.
        teacher: the frozen teacher (e.g. :class:`~kd_lightning.teachers.PretrainedTeacher`).
            ``None`` is only valid for inference after :meth:`load_from_checkpoint`, or when every
            batch carries cached teacher outputs.
        loss_terms: the objective; default :func:`hinton_loss_terms` (T=4, 0.9 KD + 0.1 CE).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (sees student, connectors and learnable loss parts only).
        lr_scheduler: scheduler factory.
    """

    frozen_model_args = ("teacher",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.student = self.build_model(student)
        self.record_student_spec(self.student)
        self.teacher = self.freeze_teacher(teacher)
        terms = loss_terms if loss_terms is not None else hinton_loss_terms()
        if not terms:
            raise ValueError(
                "loss_terms is empty: give at least one LossTerm (e.g. soft targets + CE)"
            )
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"loss term names must be unique; {duplicates} appear twice: set `name:` on each term"
            )
        self.loss_terms = nn.ModuleList(terms)
        self.needs_teacher = any(t.uses_teacher for t in terms)
        # Hooks exist only inside a step (FeatureCapture is a context manager); layer names are
        # checked now, at construction, with the nearest valid names in the error.
        student_layers = _layers(terms, "student")
        self.student_capture = (
            FeatureCapture(self.student, student_layers, model_name="student")
            if student_layers
            else None
        )
        teacher_layers = [n for t in terms if t.uses_teacher for n in t.layer_names("teacher")]
        teacher_layers = list(dict.fromkeys(teacher_layers))
        if teacher_layers and self.teacher is None:
            self.teacher_capture = None  # inference-only load: features are not needed
        else:
            self.teacher_capture = (
                FeatureCapture(self.teacher.module, teacher_layers, model_name="teacher")
                if teacher_layers
                else None
            )

    def named_output_models(self) -> list[tuple[str, nn.Module]]:
        models = [("student", self.student)]
        if self.teacher is not None:
            models.append(("teacher", self.teacher))
        return models

    def validate_setup(self, example: dict[str, Any]) -> None:
        if self.needs_teacher and self.teacher is None and "teacher_logits" not in example:
            raise ValueError(
                "OfflineDistillation needs a teacher for its loss terms: set model.init_args.teacher "
                "(e.g. class_path: kd_lightning.teachers.PretrainedTeacher with a checkpoint_path), "
                "or attach a teacher-output cache to the data"
            )
        # Dry run of the whole objective on a tiny batch: shape mismatches between (connected)
        # student features and teacher features surface now, not deep inside training. Eval mode
        # and no_grad: no BatchNorm statistics, memory banks or gradients are touched.
        with torch.no_grad(), _eval_mode(self):
            outputs = self.forward_models(example)
            for term in self.loss_terms:
                try:
                    term(*self._knowledge(outputs), example.get("target"), example.get("index"))
                except Exception as err:  # noqa: BLE001 - re-raised with the term and a fix
                    raise ValueError(self._term_error(term, outputs, err)) from err

    def _term_error(self, term: LossTerm, outputs: dict[str, Any], err: Exception) -> str:
        student, teacher = self._knowledge(outputs)
        message = f"loss term {term.name!r} cannot run on the example batch: {err}"
        s_src, t_src = term.student_source, term.teacher_source
        if (
            isinstance(s_src, str)
            and isinstance(t_src, str)
            and teacher is not None
            and term.connector is None
        ):
            s_shape, t_shape = tuple(student[s_src].shape), tuple(teacher[t_src].shape)
            if s_shape[1:] != t_shape[1:]:
                message += f". Student {s_src!r} gives {s_shape}, teacher {t_src!r} gives {t_shape}"
                fix = suggest_connector(s_shape, t_shape)
                if fix is not None:
                    message += f"; add to the term `connector: {fix}`"
        return message

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        if self.teacher is None:
            return None
        return output_logits(self.teacher(batch["input"]))

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch["input"]
        outputs: dict[str, Any] = {"student_features": {}, "teacher_features": {}}
        if self.student_capture is not None:
            with self.student_capture as features:
                outputs["student"] = self(x)
            outputs["student_features"] = features
        else:
            outputs["student"] = self(x)
        if self.teacher_capture is not None and "teacher_logits" not in batch:
            with self.teacher_capture as features:
                outputs["teacher"] = self.teacher_logits(batch)
            outputs["teacher_features"] = features
        else:
            outputs["teacher"] = self.teacher_logits(batch)
        return outputs

    @staticmethod
    def _knowledge(outputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        student = {LOGITS: outputs["student"], **outputs["student_features"]}
        if outputs["teacher"] is None:
            return student, None
        return student, {LOGITS: outputs["teacher"], **outputs["teacher_features"]}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        student, teacher = self._knowledge(outputs)
        target = batch.get("target")
        losses: dict[str, torch.Tensor] = {}
        total = outputs["student"].new_zeros((), dtype=torch.float32)
        for term in self.loss_terms:
            value = term(student, teacher, target, batch.get("index"))
            losses[term.name] = value
            total = total + term.scale(self.current_epoch) * value
        losses["loss"] = total
        return losses
