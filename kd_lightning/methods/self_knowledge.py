"""Self-knowledge distillation: the model's past predictions and same-class partners teach it.

- :class:`PSKD`: progressive self-knowledge distillation (Kim, Ji, Yoon & Hwang 2021,
  "Self-Knowledge Distillation with Progressive Refinement of Targets"): the targets mix the
  model's own predictions from the previous epoch into the one-hot labels.
- :class:`CSKD`: class-wise self-knowledge distillation (Yun, Park, Lee & Shin 2020,
  "Regularizing Class-wise Predictions via Self-knowledge Distillation"): predictions on two
  samples of the same class are made consistent.

The torch parts are elsewhere: the memory of past logits in
:mod:`kd_lightning.teachers.past_predictions`, partner sampling and the losses in
:mod:`kd_lightning.functional.self_knowledge` and :mod:`kd_lightning.losses.self_knowledge`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.data.batch import normalise_batch
from kd_lightning.functional.self_knowledge import class_partner_logits
from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.losses.self_knowledge import CSKDLoss, PSKDLoss
from kd_lightning.methods.base import default_optimizer
from kd_lightning.methods.own_knowledge import OwnKnowledgeModule, check_weight, refuse_ignored
from kd_lightning.objective import LossTerm
from kd_lightning.teachers.past_predictions import PastPredictions


# ---------------------------------------------------------------------------------- PS-KD
def pskd_loss_terms(alpha_T: float = 0.8) -> list[LossTerm]:  # noqa: N803 - the paper's name
    """PS-KD's objective: ``pskd`` (:class:`~kd_lightning.losses.self_knowledge.PSKDLoss` from
    the ``past`` knowledge) and ``ce``, the plain cross-entropy, logged with weight 0."""
    return [
        LossTerm(PSKDLoss(alpha_T), name="pskd", teacher="past"),
        LossTerm(HardLabelCrossEntropy(), weight=0.0, name="ce"),
    ]


class PSKD(OwnKnowledgeModule):
    """Progressive self-knowledge distillation: the labels are softened by the model's past self.

    At epoch t (0-based) of T = ``max_epochs``, sample x is trained towards

    .. math:: y^{soft}_t = (1 - \\alpha_t)\\, y + \\alpha_t\\, p_{t-1}(x), \\qquad
        \\alpha_t = \\alpha_T \\cdot \\frac{t + 1}{T}

    where :math:`p_{t-1}(x)` is the model's softmax on x when it was trained on it in the
    previous epoch. Knowledge of a step: ``student`` and ``past``, the logits the model gave
    each sample of the batch at its last training step
    (:class:`~kd_lightning.teachers.past_predictions.PastPredictions`, by ``batch["index"]``, in
    the checkpoint so a resumed run continues exactly). A sample without a stored prediction
    yet (the first epoch), and every sample outside training, has its one-hot label as
    ``past``, so validation and test report the plain CE. Unlabeled samples are ignored by the
    default loss. In multi-process training the stored predictions are gathered from every
    process.

    Args:
        student: the network to train.
        alpha_T: the final mixing weight :math:`\\alpha_T` of the default objective; default 0.8
            (the paper's).
        num_samples: size of the memory (largest ``index`` + 1); default: from the
            datamodule's training set at start-up.
        loss_terms: the objective over ``student`` and ``past`` (replaces the default; then
            leave ``alpha_T`` unset).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    teacher_args = ("past",)

    def __init__(
        self,
        student: nn.Module,
        alpha_T: float | None = None,  # noqa: N803 - the paper's name
        num_samples: int | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        refuse_ignored({"alpha_T": alpha_T}, loss_terms)
        if loss_terms is None:
            loss_terms = pskd_loss_terms(0.8 if alpha_T is None else alpha_T)
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        super().__init__(models={"student": student, "past": PastPredictions("student")},
                         loss_terms=None, num_classes=num_classes, optimizer=optimizer,
                         lr_scheduler=lr_scheduler)  # fmt: skip
        self.num_samples = num_samples
        self.set_objective(loss_terms)

    def training_set_size(self) -> int:
        """``num_samples``, or the largest sample index of the datamodule's training set + 1."""
        if self.num_samples is not None:
            return int(self.num_samples)
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = datamodule.dataset("train") if hasattr(datamodule, "dataset") else None
        if dataset is None or not hasattr(dataset, "indices"):
            raise ValueError(
                "PSKD stores one prediction per training sample: set num_samples (largest "
                "batch['index'] + 1) or use a TransferSetDataModule"
            )
        return int(dataset.indices.max()) + 1

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self.past.num_samples > 0:
            return
        if self.num_classes is None:
            raise ValueError(
                "PSKD sizes its memory of past predictions by num_classes: set "
                "model.init_args.num_classes"
            )
        self.past.allocate(self.training_set_size(), self.num_classes)

    def check_example(self, batch: Any, stage: str = "fit") -> None:
        batch = normalise_batch(batch)
        if stage == "fit" and "index" not in batch:
            raise ValueError(
                "PSKD needs batch['index'] (each sample's position in the training set) to "
                "remember its past predictions; use a TransferSetDataModule or add an 'index' "
                "entry to your batches"
            )
        size = self.past.num_samples
        if stage == "fit" and size and int(batch["index"].max()) >= size:
            raise ValueError(
                f"a batch index is {int(batch['index'].max())} but PSKD remembers {size} "
                f"samples: set num_samples to at least {int(batch['index'].max()) + 1}"
            )
        super().check_example(batch, stage)

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        knowledge = super().forward_knowledge(batch, stage)  # `past` is read before the write
        if stage == "train":
            self.remember(batch["index"], knowledge["student"])
        return knowledge

    @torch.no_grad()
    def remember(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Store this step's logits for the next epoch (gathered from every process)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            index = self.all_gather(index).flatten()
            logits = self.all_gather(logits).flatten(0, -2)
        self.past.write(index, logits)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint["state_dict"].get("past.logits")
        if stored is not None and stored.shape != self.past.logits.shape:
            self.past.allocate(stored.shape[0], stored.shape[1])


# ---------------------------------------------------------------------------------- CS-KD
PARTNER, PARTNER_FOUND = "partner", "partner.found"
"""Knowledge names of CS-KD's partner logits and of the mask of samples that have a partner."""


def cskd_loss_terms(temperature: float = 4.0, lambda_cls: float = 1.0) -> list[LossTerm]:
    """CS-KD's objective: ``ce`` plus ``lambda_cls`` times ``cls``, the class-wise T^2 KL from
    each sample's partner (mean over the samples that have one)."""
    check_weight("lambda_cls", lambda_cls)
    return [
        LossTerm(HardLabelCrossEntropy(), name="ce"),
        LossTerm(CSKDLoss(temperature), weight=lambda_cls, name="cls",
                 teacher=[PARTNER, PARTNER_FOUND]),
    ]  # fmt: skip


class CSKD(OwnKnowledgeModule):
    """Class-wise self-knowledge distillation: two samples of a class should be predicted alike.

    Knowledge of a step: ``student`` and ``partner``, the detached logits of each sample's
    same-class partner in the batch
    (:func:`~kd_lightning.functional.self_knowledge.same_class_partners`; a sample without one
    has its own logits), with ``partner.found`` marking the samples that have one. The default
    objective adds :math:`\\lambda\\, T^2 \\mathrm{KL}(p^T(x') \\| p^T(x))`, averaged over the
    samples that have a partner, to the hard-label CE. The paper draws the partner with a
    class-pair sampler; here it is drawn within the (shuffled) batch, so the batch must be
    large compared to the number of classes for most samples to have one.

    Args:
        student: the network to train.
        temperature: T of the default class-wise term; default 4 (the paper's).
        lambda_cls: weight :math:`\\lambda` of the default class-wise term; default 1.
        loss_terms: the objective over ``student``, ``partner`` and ``partner.found``
            (replaces the default; then leave ``temperature`` and ``lambda_cls`` unset).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        temperature: float | None = None,
        lambda_cls: float | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        refuse_ignored({"temperature": temperature, "lambda_cls": lambda_cls}, loss_terms)
        if loss_terms is None:
            loss_terms = cskd_loss_terms(
                4.0 if temperature is None else temperature,
                1.0 if lambda_cls is None else lambda_cls,
            )
        super().__init__(models={"student": student}, loss_terms=None, num_classes=num_classes,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)  # fmt: skip
        self.set_objective(loss_terms)

    def own_knowledge(self) -> list[str]:
        return [PARTNER, PARTNER_FOUND]

    @staticmethod
    def partner_knowledge(logits: torch.Tensor, target: torch.Tensor | None) -> dict[str, Any]:
        """``{"partner": (B, C) detached logits, "partner.found": (B,) bool}``."""
        partner, found = class_partner_logits(logits, target)
        return {PARTNER: partner, PARTNER_FOUND: found}

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        knowledge = super().forward_knowledge(batch, stage)
        knowledge.update(self.partner_knowledge(knowledge["student"], batch.get("target")))
        return knowledge
