"""``DataFreeDistillation``: zero-shot distillation from a transfer set synthesised from the teacher.

No real training sample is used. At the start of ``fit`` the method synthesises inputs from
the frozen teacher alone (:mod:`kd_lightning.synthesis`: DeepInversion, Yin et al. 2020; Data
Impressions, Nayak et al. 2019), hands them to its :class:`~kd_lightning.data.synthesised.
SynthesisedTransferSet` (which may save them for reuse), and trains the student on them with
soft targets (Hinton et al. 2015):

.. math:: \\mathcal{L} = T^2\\,\\mathrm{KL}\\big(\\sigma(v/T) \\,\\|\\, \\sigma(z/T)\\big)
          + \\lambda\\, \\mathrm{CE}\\big(z, \\arg\\max v\\big)

with teacher logits ``v`` recorded at synthesis and student logits ``z``; ``lambda`` is
``hard_label_weight`` (0 by default: the paper's objectives are the soft targets alone).
Validation and test run on the *real* val/test splits of the evaluation data, with the live
teacher (agreement metrics) when one is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.losses import SoftTargetKLLoss
from kd_lightning.losses.pseudo_label import TeacherTopOneCrossEntropy
from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.own_knowledge import refuse_ignored
from kd_lightning.models.spec import instantiate
from kd_lightning.objective import LossTerm
from kd_lightning.synthesis import InputSynthesiser, module_digest
from kd_lightning.teachers.cached import DENSE_KEY
from kd_lightning.validation import non_negative, positive

FAST_DEV_RUN_STEPS = 2
"""Synthesis steps per batch under ``fast_dev_run``: the pipeline is checked, not the quality."""


class DataFreeDistillation(DistillationModule):
    """Distil a frozen teacher into a student through inputs synthesised from the teacher alone.

    The datamodule must be a :class:`~kd_lightning.data.synthesised.SynthesisedTransferSet`:
    its training set is synthetic (made here at the start of ``fit``, or read from its ``path``),
    its val/test splits are real. Any other datamodule, or dataloaders passed to ``fit``
    directly, are refused, so the student can never see a real training image.

    Under ``fast_dev_run`` a tiny set (one batch, :data:`FAST_DEV_RUN_STEPS` steps) is made and
    nothing is saved.

    Args:
        student: the network to train.
        teacher: the frozen teacher (e.g. :class:`~kd_lightning.teachers.PretrainedTeacher`).
            Needed to synthesise; optional when the datamodule reads a saved set (the recorded
            teacher logits are the targets), and ``None`` for inference after loading.
        synthesiser: how to make the inputs (:class:`~kd_lightning.synthesis.DeepInversion`,
            :class:`~kd_lightning.synthesis.DataImpressions`); ``None`` when the datamodule
            reads a saved set.
        num_samples: size of the synthesised transfer set.
        temperature: soft-target temperature T of the default soft-target term (unset: 4.0).
            Only for the default objective: refused beside ``loss_terms``.
        hard_label_weight: weight of the default cross-entropy with the teacher's top-1 class
            (:class:`~kd_lightning.losses.pseudo_label.TeacherTopOneCrossEntropy`; unset or 0:
            no term). Only for the default objective, like ``temperature``.
        loss_terms: the objective, replacing the two default terms (any loss works).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (sees the student only).
        lr_scheduler: scheduler factory.
    """

    hparams_ignore = ("synthesiser",)
    objective_args: tuple[str, ...] = ("temperature", "hard_label_weight")
    """Arguments that only build the default objective (see ``OfflineDistillation``)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        synthesiser: InputSynthesiser | None = None,
        num_samples: int = 2560,
        temperature: float | None = None,
        hard_label_weight: float | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        refuse_ignored(
            {"temperature": temperature, "hard_label_weight": hard_label_weight}, loss_terms
        )
        temperature = positive(
            "temperature",
            4.0 if temperature is None else temperature,
            "Use e.g. temperature: 4.0",
        )
        hard_label_weight = non_negative(
            "hard_label_weight", 0.0 if hard_label_weight is None else hard_label_weight
        )
        if isinstance(synthesiser, dict):  # a class_path spec, from a checkpoint's hparams
            synthesiser = instantiate(synthesiser)
        if synthesiser is not None and not isinstance(synthesiser, InputSynthesiser):
            raise TypeError(
                "synthesiser must be an InputSynthesiser (kd_lightning.synthesis.DeepInversion or "
                f"DataImpressions), got {type(synthesiser).__name__}"
            )
        if loss_terms is None:
            loss_terms = [LossTerm(SoftTargetKLLoss(temperature), name="kd")]
            if hard_label_weight > 0:
                loss_terms.append(
                    LossTerm(TeacherTopOneCrossEntropy(), weight=hard_label_weight, name="ce")
                )
        super().__init__(
            models={"student": student, "teacher": teacher},
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        self.synthesiser = synthesiser
        self.num_samples = num_samples
        self.temperature = temperature
        self.hard_label_weight = hard_label_weight

    # ------------------------------------------------------------------ the synthetic set
    def _datamodule(self) -> SynthesisedTransferSet:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, SynthesisedTransferSet):
            got = "dataloaders" if datamodule is None else type(datamodule).__name__
            raise ValueError(
                "DataFreeDistillation trains on synthesised inputs only, so its data must be a "
                f"SynthesisedTransferSet (got {got}). Wrap the real data, whose val/test splits "
                "measure the student: `data: {class_path: kd_lightning.data.synthesised."
                "SynthesisedTransferSet, init_args: {evaluation: {class_path: "
                "kd_lightning.data.DigitsTransferSet}}}`"
            )
        return datamodule

    def setup(self, stage: str) -> None:
        if stage == "fit":
            datamodule = self._datamodule()
            if datamodule.has_synthesised_set:
                self._check_set_teacher(datamodule)
            else:
                self._synthesise_into(datamodule)
        super().setup(stage)

    def _check_set_teacher(self, datamodule: SynthesisedTransferSet) -> None:
        made_by = datamodule.synthesised_set().teacher_digest
        if (
            self.teacher is not None
            and made_by is not None
            and made_by != module_digest(self.teacher)
        ):
            raise ValueError(
                f"the synthesised set {datamodule.path!r} was made by a different teacher than "
                "this run's (teacher digests differ), so its recorded teacher outputs are not this "
                "teacher's: delete the file (it is synthesised again) or point `path` elsewhere"
            )

    def _synthesise_into(self, datamodule: SynthesisedTransferSet) -> None:
        if self.synthesiser is None or self.teacher is None:
            missing = " and ".join(
                n
                for n, v in [("teacher", self.teacher), ("synthesiser", self.synthesiser)]
                if v is None
            )
            raise ValueError(
                f"no synthesised set to train on and no {missing} to make one: set "
                "model.init_args.teacher and model.init_args.synthesiser (e.g. class_path: "
                "kd_lightning.synthesis.DeepInversion), or give the data a `path` to a saved set"
            )
        trainer = self.trainer
        num_classes = self.num_classes or datamodule.num_classes
        quick = bool(trainer.fast_dev_run)
        num_samples = (
            min(self.num_samples, self.synthesiser.batch_size) if quick else self.num_samples
        )
        synthesised = self.synthesiser.synthesise(
            self.teacher,
            num_samples=num_samples,
            num_classes=num_classes,
            input_shape=datamodule.input_shape,
            device=trainer.strategy.root_device,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            steps=FAST_DEV_RUN_STEPS if quick else None,
        )
        # Every rank synthesises the same set (same seed); one writes it.
        datamodule.attach(synthesised, save=trainer.is_global_zero and not quick)

    def on_train_start(self) -> None:
        # The explicit guarantee: what the training loop iterates is the synthesised set.
        datamodule = self._datamodule()
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        synthetic = datamodule.synthesised_set().inputs
        if dataset is None or getattr(dataset, "inputs", None) is not synthetic:
            raise RuntimeError(
                "DataFreeDistillation's training dataloader is not the synthesised set; refusing "
                "to train on anything else"
            )

    # ------------------------------------------------------------------ steps
    def check_example(self, batch: Any, stage: str = "fit") -> None:
        if stage == "fit" and self.teacher is None and DENSE_KEY not in batch:
            raise ValueError(
                "DataFreeDistillation needs teacher outputs: set model.init_args.teacher, or train "
                "from a saved synthesised set (its recorded teacher logits are used)"
            )
        super().check_example(batch, stage)

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """The student, and the teacher logits recorded at synthesis (else the live teacher).

        Evaluating a loaded student without its teacher, only the real labels remain: the
        objective then falls back to the hard-label cross-entropy (see :meth:`compute_losses`).
        """
        knowledge = {"student": self(batch["input"])}
        if DENSE_KEY in batch:
            knowledge["teacher"] = batch[DENSE_KEY]
        else:
            knowledge.update(self.run_source("teacher", batch, knowledge))
        return knowledge

    def compute_losses(
        self, knowledge: dict[str, Any], batch: dict[str, Any], stage: str
    ) -> dict[str, torch.Tensor]:
        if "teacher" not in knowledge:
            ce = F.cross_entropy(knowledge["student"].float(), batch["target"], ignore_index=-1)
            return {"loss": ce, "ce": ce}
        return super().compute_losses(knowledge, batch, stage)
