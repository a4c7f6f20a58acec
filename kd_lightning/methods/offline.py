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

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.connectors import suggest_connector
from kd_lightning.features import FeatureCapture, _eval_mode
from kd_lightning.functional.ensemble import (
    COMBINE_SPACES,
    PURIFY_MODES,
    WEIGHTINGS,
    ensemble_teacher_logits,
)
from kd_lightning.functional.soft_target import IGNORE_INDEX
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.base import DistillationModule, _default_optimizer
from kd_lightning.methods.loss_term import LOGITS, LossTerm
from kd_lightning.teachers import FrozenTeacher, load_student, output_logits

FALLBACKS = ("exclude", "label")


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
    """Distil one or several frozen teachers into a student with a weighted list of loss terms.

    Teachers are frozen on arrival (eval mode that ``.train()`` cannot undo, no gradients, out
    of the optimizer and out of the checkpoint). If the batch carries precomputed
    ``teacher_logits`` (a teacher-output cache), no teacher is run.

    With ``teachers`` (a list), the loss terms see one combined teacher: per sample, each
    teacher gets a weight (``teacher_weighting``), teachers flagged by ``purify`` are dropped
    (weight times ``purify_weight``), the weights are renormalised and the logits combined in
    ``teacher_combine`` space (see :func:`kd_lightning.functional.ensemble.combine_teachers`).
    Samples on which every teacher is flagged fall back to ``purify_fallback``:

    - ``"exclude"``: the sample's teacher is the student's own detached output, so every
      divergence term is 0 there with a zero gradient (hard-label terms still apply);
    - ``"label"``: the one-hot label (log-probabilities of ``(1 - 1e-6)`` one-hot) is the
      teacher; unlabeled samples are excluded as above.

    Teacher confidence, entropy and margins are read at temperature 1. Feature terms (hooked
    teacher layers) need a single ``teacher``.

    Args:
        student: the network to train.
        teacher: the frozen teacher (e.g. :class:`~kd_lightning.teachers.PretrainedTeacher`).
            ``None`` is only valid for inference after :meth:`load_from_checkpoint`, or when every
            batch carries cached teacher outputs.
        teachers: several frozen teachers (heterogeneous architectures allowed), instead of
            ``teacher``.
        loss_terms: the objective; default :func:`hinton_loss_terms` (T=4, 0.9 KD + 0.1 CE).
        teacher_weighting: ``"mean"``, ``"fixed"`` (``teacher_weights``), ``"confidence"``
            (per-sample top-1 probability) or ``"entropy"`` (per-sample softmax of minus the
            entropy).
        teacher_weights: one non-negative weight per teacher, for ``"fixed"``.
        teacher_combine: ``"logits"`` (weighted mean of logits) or ``"probabilities"`` (log of
            the weighted mixture of the teachers' softmax outputs).
        purify: ``"none"``, ``"wrong"`` (top-1 differs from the label), ``"unsure"``
            (normalised entropy above ``purify_entropy`` or top-1/top-2 margin below
            ``purify_margin``) or ``"both"``.
        purify_entropy: normalised-entropy threshold in [0, 1] for ``"unsure"``.
        purify_margin: probability-margin threshold in [0, 1] for ``"unsure"``.
        purify_weight: factor on a flagged teacher's weight (0 drops it; 0.5 halves it).
        purify_fallback: ``"exclude"`` or ``"label"`` for samples where every teacher is flagged.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (sees student, connectors and learnable loss parts only).
        lr_scheduler: scheduler factory.
    """

    frozen_model_args = ("teacher", "teachers")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        loss_terms: list[LossTerm] | None = None,
        teachers: list[nn.Module] | None = None,
        teacher_weighting: str = "mean",
        teacher_weights: list[float] | None = None,
        teacher_combine: str = "logits",
        purify: str = "none",
        purify_entropy: float | None = None,
        purify_margin: float | None = None,
        purify_weight: float = 0.0,
        purify_fallback: str = "exclude",
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._check_teacher_options(
            teacher, teachers, teacher_weighting, teacher_weights, teacher_combine, purify,
            purify_entropy, purify_margin, purify_weight, purify_fallback,
        )  # fmt: skip
        self.student = self.build_model(student)
        self.record_student_spec(self.student)
        self.teacher = self.freeze_teacher(teacher)
        self.teachers = (
            nn.ModuleList([self.freeze_teacher(t) for t in teachers]) if teachers else None
        )
        self.teacher_weighting = teacher_weighting
        self.teacher_weight_values = list(teacher_weights) if teacher_weights else None
        self.teacher_combine = teacher_combine
        self.purify = purify
        self.purify_entropy, self.purify_margin = purify_entropy, purify_margin
        self.purify_weight, self.purify_fallback = purify_weight, purify_fallback
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
        if teacher_layers and self.teachers is not None:
            raise ValueError(
                f"loss terms read teacher layers {teacher_layers}, which needs a single `teacher`; "
                "with `teachers` use logit terms only (teacher: logits)"
            )
        if teacher_layers and self.teacher is None:
            self.teacher_capture = None  # inference-only load: features are not needed
        else:
            self.teacher_capture = (
                FeatureCapture(self.teacher.module, teacher_layers, model_name="teacher")
                if teacher_layers
                else None
            )
        self._last_dropped: torch.Tensor | None = None

    @staticmethod
    def _check_teacher_options(
        teacher, teachers, weighting, weights, combine, purify, entropy, margin, factor, fallback
    ) -> None:
        if teacher is not None and teachers:
            raise ValueError(
                "give either `teacher` (one) or `teachers` (a list), not both: put the single "
                "teacher into the `teachers` list"
            )
        if teachers is not None and len(teachers) == 0:
            raise ValueError(
                "`teachers` is an empty list: give at least one teacher, or use `teacher`"
            )
        for name, value, choices in [
            ("teacher_weighting", weighting, WEIGHTINGS),
            ("teacher_combine", combine, COMBINE_SPACES),
            ("purify", purify, PURIFY_MODES),
            ("purify_fallback", fallback, FALLBACKS),
        ]:
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        if weighting == "fixed":
            if weights is None:
                raise ValueError(
                    "teacher_weighting='fixed' needs teacher_weights: one weight per teacher"
                )
            if teachers is not None and len(weights) != len(teachers):
                raise ValueError(
                    f"teacher_weights has {len(weights)} entries but there are {len(teachers)} "
                    f"teachers: give exactly {len(teachers)} weights (one per teacher, in order)"
                )
            if any(w < 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(f"teacher_weights must be >= 0 and not all 0, got {list(weights)}")
        elif weights is not None:
            raise ValueError(
                f"teacher_weights is only used with teacher_weighting='fixed' (got {weighting!r}); "
                "remove it or set teacher_weighting: fixed"
            )
        if purify in ("unsure", "both") and entropy is None and margin is None:
            raise ValueError(
                f"purify={purify!r} needs a threshold: set purify_entropy (normalised entropy in "
                "[0, 1], e.g. 0.5) and/or purify_margin (top-1 minus top-2 probability, e.g. 0.2)"
            )
        for name, value in [("purify_entropy", entropy), ("purify_margin", margin)]:
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 <= factor <= 1:
            raise ValueError(f"purify_weight must be in [0, 1], got {factor}")

    def named_output_models(self) -> list[tuple[str, nn.Module]]:
        models = [("student", self.student)]
        if self.teacher is not None:
            models.append(("teacher", self.teacher))
        if self.teachers is not None:
            models += [(f"teacher {i} (teachers.{i})", t) for i, t in enumerate(self.teachers)]
        return models

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teachers is not None

    def validate_setup(self, example: dict[str, Any]) -> None:
        cached = "teacher_logits" in example or TOPK_VALUES in example  # teacher cache (issue 5)
        if self.needs_teacher and not self.has_teacher and not cached:
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
        self._last_dropped = None

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

    def teacher_logits(
        self, batch: dict[str, Any], student: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The (combined) teacher logits of a batch; ``student`` logits serve the "exclude" fallback."""
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        if self.teachers is not None:
            return self.combined_teacher_logits(batch, student)
        if self.teacher is None:
            return None
        return output_logits(self.teacher(batch["input"]))

    def combined_teacher_logits(
        self, batch: dict[str, Any], student: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted, purified combination of the teachers (see the class docstring)."""
        stacked = torch.stack(
            [output_logits(t(batch["input"])).float() for t in self.teachers]  # type: ignore[union-attr]
        )
        target = batch.get("target")
        combined, covered, keep = ensemble_teacher_logits(
            stacked,
            target,
            weighting=self.teacher_weighting,
            fixed_weights=self.teacher_weight_values,
            purify=self.purify,
            max_entropy=self.purify_entropy,
            min_margin=self.purify_margin,
            purify_weight=self.purify_weight,
            space=self.teacher_combine,
        )
        self._last_dropped = (~keep).float().mean()
        if self.purify == "none":
            return combined
        uncovered = ~covered
        if self.purify_fallback == "label" and target is not None:
            labeled = target != IGNORE_INDEX
            one_hot = torch.nn.functional.one_hot(target.clamp_min(0), combined.shape[-1])
            label_logits = (one_hot.float() * (1 - 1e-6) + 1e-6 / combined.shape[-1]).log()
            combined = torch.where((uncovered & labeled).unsqueeze(-1), label_logits, combined)
            uncovered = uncovered & ~labeled
        if student is not None:
            combined = torch.where(uncovered.unsqueeze(-1), student.detach().float(), combined)
        return combined

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
            outputs["teacher"] = self.teacher_logits(batch, outputs["student"])
        # -- teacher cache (issue 5): sparse top-k knowledge, read by LossTerm(teacher="topk") --
        if TOPK_VALUES in batch:
            outputs["teacher_topk"] = (batch[TOPK_VALUES], batch["teacher_topk_indices"])
        # -- end teacher cache --
        return outputs

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        super().log_metrics(stage, student, teacher, target)
        if self._last_dropped is not None and self.purify != "none":
            # Fraction of (teacher, sample) pairs whose knowledge purification removed.
            self.log(f"{stage}/teacher_dropped", self._last_dropped, on_step=False, on_epoch=True)
            self._last_dropped = None

    @staticmethod
    def _knowledge(outputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        student = {LOGITS: outputs["student"], **outputs["student_features"]}
        # -- teacher cache (issue 5): a cached top-k teacher may come without dense logits --
        topk = {"topk": outputs["teacher_topk"]} if "teacher_topk" in outputs else {}
        if outputs["teacher"] is None:
            return student, (topk or None)
        return student, {LOGITS: outputs["teacher"], **outputs["teacher_features"], **topk}
        # -- end teacher cache --

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
            total = total + term.scale_in(list(self.loss_terms), self.current_epoch) * value
        losses["loss"] = total
        return losses


TOPK_VALUES = "teacher_topk_values"
"""Batch key of cached sparse teacher knowledge (with ``teacher_topk_indices``); issue 5."""


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
        temperature: soft-target temperature of the default objective.
        alpha: weight of the soft-target term (1 - alpha goes to the hard labels).
        loss_terms: replaces the default objective when given.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    frozen_model_args = ("teacher",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        temperature: float = 1.0,
        alpha: float = 1.0,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        terms = loss_terms
        if terms is None:
            terms = [LossTerm(SoftTargetKLLoss(temperature), weight=alpha, name="kd")]
            if alpha < 1:
                terms.append(LossTerm(HardLabelCrossEntropy(), weight=1 - alpha, name="ce"))
        super().__init__(
            student=student,
            teacher=teacher,
            loss_terms=terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )

    def validate_setup(self, example: dict[str, Any]) -> None:
        if self.teacher is not None and _architecture(self.teacher) != _architecture(self.student):
            raise ValueError(
                "BornAgain needs a teacher of the student's own architecture (the previous "
                f"generation): the teacher is a {type(self.teacher.module).__name__} with other "
                f"parameter shapes than the student ({type(self.student).__name__}); use the "
                "same model config for both, or OfflineDistillation for a different teacher"
            )
        super().validate_setup(example)


class PermutedTeacher(FrozenTeacher):
    """A deliberately wrong teacher: a checkpoint's student with its output classes permuted.

    Output ``c`` is the wrapped model's logit for class ``permutation[c]``, so the teacher is
    as confident as the original and wrong wherever the permutation moves the class: a
    controlled corruption for robustness experiments (multi-teacher knowledge purification).

    Args:
        checkpoint_path: a ``.ckpt`` written by this library (its student is loaded).
        permutation: the class permutation; default: a derangement (no class kept) drawn
            with ``seed``.
        seed: seed of the default permutation.
        model: the architecture, when the checkpoint does not record its spec.
    """

    def __init__(
        self,
        checkpoint_path: str,
        permutation: list[int] | None = None,
        seed: int = 0,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__(load_student(checkpoint_path, model))
        self.checkpoint_path = str(checkpoint_path)
        if permutation is not None and sorted(permutation) != list(range(len(permutation))):
            raise ValueError(f"permutation must list 0..C-1 once each, got {permutation}")
        self.permutation = permutation
        self.seed = seed

    def class_permutation(self, num_classes: int) -> torch.Tensor:
        if self.permutation is not None:
            if len(self.permutation) != num_classes:
                raise ValueError(
                    f"permutation has {len(self.permutation)} entries, the teacher outputs "
                    f"{num_classes} classes"
                )
            return torch.as_tensor(self.permutation)
        generator = torch.Generator().manual_seed(self.seed)
        while True:  # a derangement: every class moves
            perm = torch.randperm(num_classes, generator=generator)
            if not (perm == torch.arange(num_classes)).any():
                return perm

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = output_logits(super().forward(*args, **kwargs))
        return logits[..., self.class_permutation(logits.shape[-1]).to(logits.device)]
