"""Self-distillation: the model is its own teacher.

- :class:`BranchSelfDistillation`: Be Your Own Teacher (Zhang et al. 2019, "Be Your Own
  Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation").
  Auxiliary classifiers read intermediate layers (forward hooks) and learn from the labels, the
  deepest exit's soft output and (optionally) its features.
- :class:`MeanTeacherDistillation`: an exponential moving average of the student is the
  teacher (Tarvainen & Valpola 2017, "Mean teachers are better role models").
- :class:`PSKD`: progressive self-knowledge distillation (Kim, Ji, Yoon & Hwang 2021,
  "Self-Knowledge Distillation with Progressive Refinement of Targets"): the targets mix the
  model's own predictions from the previous epoch into the one-hot labels.
- :class:`CSKD`: class-wise self-knowledge distillation (Yun, Park, Lee & Shin 2020,
  "Regularizing Class-wise Predictions via Self-knowledge Distillation"): predictions on two
  samples of the same class are made consistent.
- Born-Again networks (Furlanello et al. 2018) are offline distillation from the previous
  generation: :class:`kd_lightning.methods.offline.BornAgain`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.features import FeatureCapture, _eval_mode
from kd_lightning.functional.soft_target import (
    IGNORE_INDEX,
    hard_label_cross_entropy,
    soft_target_kl,
)
from kd_lightning.methods.base import DistillationModule, _default_optimizer
from kd_lightning.methods.online import log_accuracy, make_accuracies
from kd_lightning.teachers import CHECKPOINT_KEY, output_logits


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _per_sample_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` per row, teacher detached, float32."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2


class _SingleModelMethod(DistillationModule):
    """Shared init of the methods that train one ``student`` (and maybe parts attached to it)."""

    def _init_student(self, student: nn.Module) -> None:
        self.student = self.build_model(student)
        self.record_student_spec(self.student)


# ---------------------------------------------------------------------------------- BYOT
def _pooled(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)`` by global average, ``(B, N, C)`` -> ``(B, C)`` by token mean."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    return feature.flatten(1)


class BranchHead(nn.Module):
    """Auxiliary exit on an intermediate feature: a small body to a ``width`` embedding, then a classifier.

    Feature maps ``(C, H, W)`` get conv3x3-BN-ReLU (BYOT's "bottleneck" that adapts shallow
    features) and global average pooling; token sequences ``(N, C)`` are averaged over tokens;
    vectors ``(C,)`` go through Linear-ReLU.

    Args:
        feature_shape: shape of one sample's feature (without the batch dimension).
        width: size of the embedding (the deepest feature's size when a hint term compares them).
        num_classes: number of logits.
    """

    def __init__(self, feature_shape: list[int], width: int, num_classes: int) -> None:
        super().__init__()
        self.feature_shape = list(feature_shape)
        if len(feature_shape) == 3:
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(feature_shape[0], width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        elif len(feature_shape) in (1, 2):
            self.body = nn.Sequential(nn.Linear(feature_shape[-1], width), nn.ReLU())
        else:
            raise ValueError(
                f"a branch feature must be (C,), (N, C) or (C, H, W) per sample, got {feature_shape}"
            )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feature.dim() == 3:  # tokens
            feature = feature.mean(dim=1)
        embedding = self.body(feature)
        return embedding, self.classifier(embedding)


class BranchSelfDistillation(_SingleModelMethod):
    """Be Your Own Teacher: shallow exits learn from the network's deepest exit.

    Each layer named in ``branches`` gets an auxiliary :class:`BranchHead` (built at start-up
    from the feature shapes of an example batch, kept in the checkpoint as ``heads.<i>.*``).
    The deepest exit (the model's own output) learns from the labels; branch ``i`` minimises

    .. math:: (1 - \\alpha)\\, \\mathcal{L}_{CE}(z_i, y) + \\alpha\\, T^2 \\mathrm{KL}(p_C^T \\| p_i^T)
        + \\lambda \\lVert e_i - f_C \\rVert_2^2

    with the deepest logits :math:`z_C` and deepest feature :math:`f_C` (read at
    ``feature_layer``, pooled) detached. The shallow losses also train the shared backbone.
    The student (exported, ``student.*``) is the unmodified model; the heads are training aids.

    Args:
        student: the network.
        branches: layer paths to attach exits to, shallow to deep (e.g. ``["stage1"]``); a
            name that does not exist fails at construction with the nearest valid names.
        feature_layer: layer whose output is the deepest feature for the hint term (e.g.
            ``"pool"``); required when ``hint_weight > 0``.
        temperature: softening temperature T of the KL from the deepest exit.
        alpha: weight of the KL term against the hard-label term of each branch.
        hint_weight: weight :math:`\\lambda` of the feature hint (0 disables it).
        head_width: embedding size of the heads (without a hint term).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (backbone and heads).
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        branches: list[str],
        feature_layer: str | None = None,
        temperature: float = 3.0,
        alpha: float = 0.3,
        hint_weight: float = 0.0,
        head_width: int = 64,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._init_student(student)
        if not branches:
            raise ValueError(
                "branches is empty: name at least one layer to attach an exit to, e.g. "
                "branches: [stage1] (kd_lightning.features.list_layer_names(model) lists them)"
            )
        _check_positive("temperature", temperature)
        _check_unit("alpha", alpha)
        if hint_weight < 0:
            raise ValueError(f"hint_weight must be >= 0, got {hint_weight}")
        if hint_weight > 0 and feature_layer is None:
            raise ValueError(
                "hint_weight > 0 needs feature_layer: the layer holding the deepest feature "
                "(e.g. 'pool' for SmallCNN, 'hidden' for MLP)"
            )
        self.branches = list(branches)
        self.feature_layer = feature_layer
        layers = self.branches + ([feature_layer] if feature_layer is not None else [])
        self.capture = FeatureCapture(
            self.student, list(dict.fromkeys(layers)), model_name="student"
        )
        self.temperature, self.alpha, self.hint_weight = float(temperature), alpha, hint_weight
        self.head_width = head_width
        self.heads: nn.ModuleList | None = None
        self._head_config: dict[str, Any] | None = None
        self._branch_outputs: list[torch.Tensor] | None = None

    def build_heads(self, example_input: Any) -> None:
        """Create the branch heads from one forward pass (no-op when they exist)."""
        if self.heads is not None:
            return
        with torch.no_grad(), _eval_mode(self.student), self.capture as features:
            logits = output_logits(self.student(example_input))
        num_classes = self.num_classes or logits.shape[-1]
        width = self.head_width
        if self.feature_layer is not None:
            width = _pooled(features[self.feature_layer]).shape[-1]
        shapes = [list(features[name].shape[1:]) for name in self.branches]
        self._make_heads({"shapes": shapes, "width": width, "num_classes": num_classes})

    def _make_heads(self, config: dict[str, Any]) -> None:
        self._head_config = config
        self.heads = nn.ModuleList(
            [BranchHead(s, config["width"], config["num_classes"]) for s in config["shapes"]]
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.heads is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if not hasattr(datamodule, "example_batch"):
                raise ValueError(
                    "BranchSelfDistillation builds its branch heads from an example batch: use a "
                    "TransferSetDataModule, or call module.build_heads(example_input) before fit"
                )
            self.build_heads(datamodule.example_batch()["input"])

    def configure_metrics(self, num_classes: int) -> None:
        super().configure_metrics(num_classes)
        self.branch_metrics = make_accuracies(
            [f"branch{i}" for i in range(len(self.branches))], num_classes
        )

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.heads is None:
            self.build_heads(batch["input"])
        with self.capture as features:
            logits = self(batch["input"])
        exits = [head(features[name]) for head, name in zip(self.heads, self.branches, strict=True)]
        deepest = _pooled(features[self.feature_layer]) if self.feature_layer else None
        self._branch_outputs = [z for _, z in exits]
        return {"student": logits, "teacher": None, "exits": exits, "deepest_feature": deepest}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        target = batch["target"]
        deepest = outputs["student"]
        ce = hard_label_cross_entropy(deepest, target)
        losses: dict[str, torch.Tensor] = {"ce": ce}
        total = ce
        for i, (embedding, logits) in enumerate(outputs["exits"]):
            branch_ce = hard_label_cross_entropy(logits, target)
            kd = soft_target_kl(logits, deepest, self.temperature)  # deepest detached inside
            losses[f"ce_branch{i}"], losses[f"kd_branch{i}"] = branch_ce, kd
            total = total + (1 - self.alpha) * branch_ce + self.alpha * kd
            if self.hint_weight > 0:
                hint = (embedding.float() - outputs["deepest_feature"].detach().float()).pow(2)
                hint = hint.sum(dim=-1).mean()
                losses[f"hint_branch{i}"] = hint
                total = total + self.hint_weight * hint
        losses["loss"] = total
        return losses

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        super().log_metrics(stage, student, teacher, target)
        exits, self._branch_outputs = self._branch_outputs, None
        for i, logits in enumerate(exits or []):
            log_accuracy(self, self.branch_metrics, stage, f"branch{i}", logits, target)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["branch_heads"] = self._head_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        config = checkpoint.get(CHECKPOINT_KEY, {}).get("branch_heads")
        if self.heads is None and config is not None:
            self._make_heads(config)


# ---------------------------------------------------------------------------------- EMA
class EMATeacher(nn.Module):
    """A copy of a model that only changes by :meth:`update` (exponential moving average).

    Unlike :class:`~kd_lightning.teachers.FrozenTeacher` it stays in the checkpoint: it is
    state of the run. It is always in eval mode, has ``requires_grad=False`` (never in the
    optimizer) and runs without autograd.

    Args:
        model: the model to copy (deep-copied; the original is not touched).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


class MeanTeacherDistillation(_SingleModelMethod):
    """The teacher is an exponential moving average (EMA) of the student's weights.

    After every optimizer step, :math:`\\theta' \\leftarrow d\\, \\theta' + (1 - d)\\, \\theta`
    with :math:`d = \\min(\\text{decay}, 1 - 1/(\\text{step} + 1))` (Tarvainen & Valpola's ramp,
    so early averages are not dominated by the random initialisation); BatchNorm statistics
    are copied. The student minimises the hard-label CE plus ``consistency_weight`` times a
    consistency to the EMA teacher: ``"kl"`` (:math:`T^2 \\mathrm{KL}(p'^T \\| p^T)`) or
    ``"mse"`` (squared distance of the probabilities, the paper's choice). The EMA model is in
    the checkpoint (``ema.module.*``) and logged as ``{stage}/acc_ema``; the student is exported.

    Args:
        student: the network to train.
        decay: EMA decay d in [0, 1).
        temperature: softening temperature of the ``"kl"`` consistency.
        consistency_weight: weight of the consistency term.
        consistency: ``"kl"`` or ``"mse"``.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (the student only).
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.99,
        temperature: float = 1.0,
        consistency_weight: float = 1.0,
        consistency: str = "kl",
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._init_student(student)
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay} (e.g. 0.99 or 0.999)")
        _check_positive("temperature", temperature)
        if consistency not in ("kl", "mse"):
            raise ValueError(f"consistency must be one of ['kl', 'mse'], got {consistency!r}")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        self.ema = EMATeacher(self.student)
        self.decay, self.temperature = decay, float(temperature)
        self.consistency_weight, self.consistency = consistency_weight, consistency
        self._ema_step = -1

    def configure_metrics(self, num_classes: int) -> None:
        super().configure_metrics(num_classes)
        self.ema_metrics = make_accuracies(["ema"], num_classes)

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch["input"]
        return {"student": self(x), "teacher": output_logits(self.ema(x))}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        student, teacher = outputs["student"], outputs["teacher"]
        ce = hard_label_cross_entropy(student, batch["target"])
        if self.consistency == "kl":
            consistency = soft_target_kl(student, teacher, self.temperature)
        else:
            diff = F.softmax(student.float(), -1) - F.softmax(teacher.float(), -1)
            consistency = diff.pow(2).sum(-1).mean()
        return {
            "loss": ce + self.consistency_weight * consistency,
            "ce": ce,
            "consistency": consistency,
        }

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        super().log_metrics(stage, student, teacher, target)
        if teacher is not None:
            log_accuracy(self, self.ema_metrics, stage, "ema", teacher, target)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimizer step (gradient accumulation calls this on every micro-batch).
        step = self.global_step
        if step == self._ema_step:
            return
        self._ema_step = step
        self.ema.update(self.student, min(self.decay, 1.0 - 1.0 / (step + 1)))


# ---------------------------------------------------------------------------------- PS-KD
class PSKD(_SingleModelMethod):
    """Progressive self-knowledge distillation: the labels are softened by the model's past self.

    At epoch t (0-based) of T = ``max_epochs``, sample x is trained towards

    .. math:: y^{soft}_t = (1 - \\alpha_t)\\, y + \\alpha_t\\, p_{t-1}(x), \\qquad
        \\alpha_t = \\alpha_T \\cdot \\frac{t + 1}{T}

    where :math:`p_{t-1}(x)` is the model's softmax on x when it was trained on it in the
    previous epoch (stored per sample ``index`` in a buffer that is part of the checkpoint, so
    a resumed run continues exactly). Samples with no stored prediction yet (the first epoch)
    use the one-hot label. Unlabeled samples (``target == -1``) are ignored. Validation and test
    report the plain CE. In multi-process training the stored predictions are gathered from
    every process.

    Args:
        student: the network to train.
        alpha_T: the final mixing weight :math:`\\alpha_T` (0.8 in the paper).
        num_samples: size of the prediction buffer (largest ``index`` + 1); default: from the
            datamodule's training set at start-up.
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        alpha_T: float = 0.8,  # noqa: N803 - the paper's name
        num_samples: int | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._init_student(student)
        _check_unit("alpha_T", alpha_T)
        self.alpha_T = alpha_T
        self.num_samples = num_samples
        self.register_buffer("past_predictions", torch.zeros(0, 0))
        self.register_buffer("has_past", torch.zeros(0, dtype=torch.bool))

    def _allocate(self, num_samples: int, num_classes: int) -> None:
        device = self.past_predictions.device
        self.past_predictions = torch.zeros(num_samples, num_classes, device=device)
        self.has_past = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.past_predictions.numel() > 0:
            return
        size = self.num_samples
        if size is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            dataset = datamodule.dataset("train") if hasattr(datamodule, "dataset") else None
            if dataset is None or not hasattr(dataset, "indices"):
                raise ValueError(
                    "PSKD stores one prediction per training sample: set num_samples (largest "
                    "batch['index'] + 1) or use a TransferSetDataModule"
                )
            size = int(dataset.indices.max()) + 1
        self._allocate(size, self.num_classes)

    def validate_setup(self, example: dict[str, Any]) -> None:
        if "index" not in example:
            raise ValueError(
                "PSKD needs batch['index'] (each sample's position in the training set) to "
                "remember its past predictions; use a TransferSetDataModule"
            )

    def alpha(self, epoch: int) -> float:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if not max_epochs or max_epochs < 0:
            raise ValueError("PSKD needs trainer.max_epochs (alpha_t grows to alpha_T at the end)")
        return self.alpha_T * min(1.0, (epoch + 1) / max_epochs)

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"student": self(batch["input"]), "teacher": None}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        logits, target = outputs["student"], batch["target"]
        if not self.training:
            ce = hard_label_cross_entropy(logits, target)
            return {"loss": ce, "ce": ce}
        index = batch["index"]
        labeled = target != IGNORE_INDEX
        one_hot = F.one_hot(target.clamp_min(0), logits.shape[-1]).float()
        alpha = self.alpha(self.current_epoch) * self.has_past[index].float().unsqueeze(-1)
        soft = (1 - alpha) * one_hot + alpha * self.past_predictions[index]
        per_sample = -(soft * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        loss = (per_sample * labeled).sum() / labeled.sum().clamp_min(1)
        self._store(index, F.softmax(logits.detach().float(), dim=-1))
        return {"loss": loss, "pskd": loss, "ce": hard_label_cross_entropy(logits.detach(), target)}

    @torch.no_grad()
    def _store(self, index: torch.Tensor, probabilities: torch.Tensor) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            index = self.all_gather(index).flatten()
            probabilities = self.all_gather(probabilities).flatten(0, -2)
        self.past_predictions[index] = probabilities
        self.has_past[index] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint["state_dict"].get("past_predictions")
        if stored is not None and stored.shape != self.past_predictions.shape:
            self._allocate(stored.shape[0], stored.shape[1])


# ---------------------------------------------------------------------------------- CS-KD
def same_class_partners(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, another labeled sample of its class in the batch: ``(partner, has_partner)``.

    The partner of sample i is the first j after i (cyclically, in batch order) with the same
    label; batches are shuffled, so this is a random pairing. Vectorised over a ``(B, B)``
    matrix, no host synchronisation. Unlabeled samples have no partner.
    """
    b = target.shape[0]
    positions = torch.arange(b, device=target.device)
    distance = (positions.unsqueeze(0) - positions.unsqueeze(1)) % b  # [i, j] = (j - i) mod B
    labeled = target != IGNORE_INDEX
    same = (
        (target.unsqueeze(0) == target.unsqueeze(1)) & labeled.unsqueeze(0) & labeled.unsqueeze(1)
    )
    same &= distance > 0
    distance = torch.where(same, distance, b)
    nearest, partner = distance.min(dim=1)
    return partner, nearest < b


class CSKD(_SingleModelMethod):
    """Class-wise self-knowledge distillation: two samples of a class should be predicted alike.

    For each labeled sample x with a same-class partner x' in the batch
    (:func:`same_class_partners`), the loss adds
    :math:`\\lambda\\, T^2 \\mathrm{KL}(p^T(x') \\| p^T(x))` with the partner's prediction
    detached, averaged over the samples that have a partner, to the hard-label CE. The paper
    draws the partner with a class-pair sampler; here it is drawn within the (shuffled) batch,
    so the batch must be large compared to the number of classes for most samples to have one.

    Args:
        student: the network to train.
        temperature: softening temperature T (4 in the paper).
        lambda_cls: weight :math:`\\lambda` of the class-wise term (1 in the paper).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory.
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        temperature: float = 4.0,
        lambda_cls: float = 1.0,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._init_student(student)
        _check_positive("temperature", temperature)
        if lambda_cls < 0:
            raise ValueError(f"lambda_cls must be >= 0, got {lambda_cls}")
        self.temperature, self.lambda_cls = float(temperature), lambda_cls

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"student": self(batch["input"]), "teacher": None}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        logits, target = outputs["student"], batch["target"]
        ce = hard_label_cross_entropy(logits, target)
        partner, has_partner = same_class_partners(target)
        kl = _per_sample_kl(logits, logits[partner], self.temperature)
        cls = (kl * has_partner).sum() / has_partner.sum().clamp_min(1)
        return {"loss": ce + self.lambda_cls * cls, "ce": ce, "cls": cls}


__all__ = [
    "CSKD",
    "PSKD",
    "BranchHead",
    "BranchSelfDistillation",
    "EMATeacher",
    "MeanTeacherDistillation",
    "same_class_partners",
]
