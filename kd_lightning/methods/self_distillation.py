"""Self-distillation: the model is its own teacher.

- :class:`BranchSelfDistillation`: Be Your Own Teacher (Zhang et al. 2019, "Be Your Own
  Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation").
  Auxiliary exits read intermediate layers (forward hooks) and learn from the labels, the
  deepest exit's soft output and (optionally) its features.
- :class:`MeanTeacherDistillation`: an exponential moving average of the student is the
  teacher (Tarvainen & Valpola 2017, "Mean teachers are better role models").
- :class:`~kd_lightning.methods.self_knowledge.PSKD` and
  :class:`~kd_lightning.methods.self_knowledge.CSKD` (self-knowledge distillation from past
  predictions and same-class partners) live in :mod:`kd_lightning.methods.self_knowledge` and
  are re-exported here.
- Born-Again networks (Furlanello et al. 2018) are offline distillation from the previous
  generation: :class:`kd_lightning.methods.offline.BornAgain`.

The torch parts are elsewhere: exits in :mod:`kd_lightning.models.branch_heads`, the EMA in
:mod:`kd_lightning.teachers.ema`, losses in :mod:`kd_lightning.losses.self_knowledge`.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.artifact import CHECKPOINT_KEY
from kd_lightning.data.batch import normalise_batch
from kd_lightning.functional.self_knowledge import global_pool
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.losses.self_knowledge import BranchHintLoss, ConsistencyMSELoss
from kd_lightning.methods.base import default_optimizer
from kd_lightning.methods.checks import rng_state, set_rng_state, untouched
from kd_lightning.methods.own_knowledge import OwnKnowledgeModule, check_weight, refuse_ignored
from kd_lightning.methods.self_knowledge import CSKD, PSKD
from kd_lightning.models.branch_heads import BranchHead, branch_heads
from kd_lightning.models.spec import instantiate
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import EMATeacher
from kd_lightning.validation import positive


# ---------------------------------------------------------------------------------- BYOT
def byot_loss_terms(
    num_exits: int,
    temperature: float = 3.0,
    alpha: float = 0.3,
    hint_weight: float = 0.0,
    feature_layer: str | None = None,
) -> list[LossTerm]:
    """BYOT's objective: ``ce`` on the deepest exit (``student``); per exit i, ``ce_exit<i>``
    (weight ``1 - alpha``), ``kd_exit<i>`` = T^2 KL from the deepest exit (weight ``alpha``)
    and, if ``hint_weight > 0``, ``hint_exit<i>`` from ``exit<i>.embedding`` to the deepest
    feature ``student.<feature_layer>``.

    Raises:
        ValueError: a weight or temperature out of range, or a hint without ``feature_layer``.
    """
    temperature = positive("temperature", temperature, "Use e.g. temperature: 3.0")
    check_weight("alpha", alpha, 1.0)
    check_weight("hint_weight", hint_weight)
    if hint_weight > 0 and feature_layer is None:
        raise ValueError(
            "hint_weight > 0 needs feature_layer: the layer holding the deepest feature "
            "(e.g. 'pool' for SmallCNN, 'hidden' for MLP)"
        )
    terms = [LossTerm(HardLabelCrossEntropy(), name="ce")]
    for i in range(num_exits):
        exit_ = f"exit{i}"
        terms += [
            LossTerm(HardLabelCrossEntropy(), weight=1 - alpha, name=f"ce_{exit_}", student=exit_),
            LossTerm(SoftTargetKLLoss(temperature), weight=alpha, name=f"kd_{exit_}",
                     student=exit_, teacher="student"),
        ]  # fmt: skip
        if hint_weight > 0:
            terms.append(
                LossTerm(BranchHintLoss(), weight=hint_weight, name=f"hint_{exit_}",
                         student=f"{exit_}.embedding", teacher=f"student.{feature_layer}")
            )  # fmt: skip
    return terms


class BranchSelfDistillation(OwnKnowledgeModule):
    """Be Your Own Teacher: shallow exits learn from the network's deepest exit.

    Each layer named in ``branches`` gets an auxiliary
    :class:`~kd_lightning.models.branch_heads.BranchHead` (built at start-up from the feature
    shapes of one batch, kept in the checkpoint as ``heads.<i>.*``). Knowledge of a step:
    ``student`` (the deepest exit), ``exit<i>`` (exit i's logits), ``exit<i>.embedding`` and the
    hooked layers ``student.<layer>``. The default objective, per exit i,

    .. math:: (1 - \\alpha)\\, \\mathcal{L}_{CE}(z_i, y) + \\alpha\\, T^2 \\mathrm{KL}(p_C^T \\| p_i^T)
        + \\lambda \\lVert e_i - f_C \\rVert_2^2

    plus the CE of the deepest exit, with the deepest logits :math:`z_C` and feature
    :math:`f_C` (``feature_layer``, pooled) detached; the shallow losses also train the shared
    backbone. The student (exported, ``student.*``) is the unmodified model; the heads are
    training aids. Logs ``{stage}/acc_exit<i>``.

    Args:
        student: the network.
        branches: layer paths to attach exits to, shallow to deep (e.g. ``["stage1"]``); a
            name that does not exist fails at construction with the nearest valid names.
        feature_layer: layer whose output is the deepest feature (the heads' embedding width);
            required when ``hint_weight > 0``.
        temperature: T of the default KL from the deepest exit; default 3.
        alpha: weight of that KL against each exit's CE; default 0.3.
        hint_weight: weight :math:`\\lambda` of the default feature hint; default 0 (off).
        head_width: embedding size of the heads when there is no ``feature_layer``.
        loss_terms: the objective over ``student``, ``exit<i>``, ``exit<i>.embedding`` and
            ``student.<layer>`` (replaces the default; then leave ``temperature``, ``alpha`` and
            ``hint_weight`` unset).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (backbone and heads).
        lr_scheduler: scheduler factory.
    """

    def __init__(
        self,
        student: nn.Module,
        branches: list[str],
        feature_layer: str | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        hint_weight: float | None = None,
        head_width: int = 64,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not branches:
            raise ValueError(
                "branches is empty: name at least one layer to attach an exit to, e.g. "
                "branches: [stage1] (kd_lightning.features.list_layer_names(model) lists them)"
            )
        refuse_ignored({"temperature": temperature, "alpha": alpha, "hint_weight": hint_weight},
                       loss_terms)  # fmt: skip
        if loss_terms is None:
            loss_terms = byot_loss_terms(
                len(branches),
                3.0 if temperature is None else temperature,
                0.3 if alpha is None else alpha,
                0.0 if hint_weight is None else hint_weight,
                feature_layer,
            )
        super().__init__(models={"student": student}, loss_terms=None, num_classes=num_classes,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)  # fmt: skip
        self.branches = list(branches)
        self.feature_layer = feature_layer
        self.head_width = int(head_width)
        self.heads: nn.ModuleList | None = None
        self.head_config: dict[str, Any] | None = None
        self.set_objective(loss_terms)

    @property
    def exit_names(self) -> list[str]:
        return [f"exit{i}" for i in range(len(self.branches))]

    def own_knowledge(self) -> list[str]:
        return [*self.exit_names, *[f"{name}.embedding" for name in self.exit_names]]

    def hooked_layers(self) -> dict[str, list[str]]:
        layers = super().hooked_layers()
        extra = self.branches + ([self.feature_layer] if self.feature_layer else [])
        layers["student"] = list(dict.fromkeys([*extra, *layers.get("student", [])]))
        return layers

    def metric_sources(self) -> list[str]:
        return self.exit_names

    # ------------------------------------------------------------------ heads
    def build_heads(self, example_input: Any) -> None:
        """Create the exits from one forward pass on ``example_input`` (no-op when they exist)."""
        if self.heads is not None:
            return
        with untouched(self.student):
            knowledge = self.run_source("student", {"input": example_input}, {})
        width = self.head_width
        if self.feature_layer is not None:
            width = global_pool(knowledge[f"student.{self.feature_layer}"]).shape[-1]
        shapes = [list(knowledge[f"student.{name}"].shape[1:]) for name in self.branches]
        self.make_heads({"shapes": shapes, "width": int(width),
                         "num_classes": int(knowledge["student"].shape[-1])})  # fmt: skip

    def make_heads(self, config: dict[str, Any]) -> None:
        """Create the exits from a recorded config (``shapes``, ``width``, ``num_classes``)."""
        self.head_config = dict(config)
        self.heads = branch_heads(config)

    def example_input(self) -> Any:
        """One input batch of the trainer's data (an ``example_batch()`` or a first train batch)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "example_batch"):
            return normalise_batch(datamodule.example_batch())["input"]
        if hasattr(datamodule, "train_dataloader"):
            state = rng_state()  # drawing a batch must not shift the run's random numbers
            try:
                return normalise_batch(next(iter(datamodule.train_dataloader())))["input"]
            finally:
                set_rng_state(state)
        raise ValueError(
            "BranchSelfDistillation builds its exits from one batch before training: give the "
            "trainer a LightningDataModule, or call module.build_heads(example_input) before fit"
        )

    def setup(self, stage: str) -> None:
        if self.heads is None:
            self.build_heads(self.example_input())
        super().setup(stage)

    def check_example(self, batch: Any, stage: str = "fit") -> None:
        """The base's checks; without exits yet (before ``setup``), they run with exits built
        from ``batch`` for the check alone, then dropped with the random state restored, so
        the module is left as it was and ``setup`` builds the exits a fit trains."""
        if self.heads is not None:
            super().check_example(batch, stage)
            return
        state = rng_state()
        try:
            self.build_heads(normalise_batch(batch)["input"])
            super().check_example(batch, stage)
        finally:
            self.heads, self.head_config = None, None
            set_rng_state(state)

    # ------------------------------------------------------------------ knowledge
    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        if self.heads is None:
            raise RuntimeError(
                "BranchSelfDistillation's exits are not built: call "
                "module.build_heads(example_input) (a trainer does it in setup)"
            )
        knowledge = self.run_source("student", batch, {})
        for name, head, layer in zip(self.exit_names, self.heads, self.branches, strict=True):
            knowledge[f"{name}.embedding"], knowledge[name] = head(knowledge[f"student.{layer}"])
        return knowledge

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["branch_heads"] = self.head_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        config = checkpoint.get(CHECKPOINT_KEY, {}).get("branch_heads")
        if config is None:
            return
        if self.heads is None:
            self.make_heads(config)
        elif dict(config) != self.head_config:
            raise ValueError(
                f"the checkpoint's exits {config} differ from this module's {self.head_config}: "
                "resume with the same student, branches and feature_layer"
            )


# ---------------------------------------------------------------------------------- EMA
def mean_teacher_terms(
    temperature: float = 1.0, consistency_weight: float = 1.0, consistency: str = "kl"
) -> list[LossTerm]:
    """The mean teacher's objective: ``ce`` plus ``consistency`` to the EMA (``ema``) knowledge:
    ``"kl"`` = T^2 KL(p_ema^T || p^T), ``"mse"`` = squared distance of the probabilities.

    Raises:
        ValueError: an unknown consistency, a negative weight or a temperature that is not > 0.
    """
    if consistency not in ("kl", "mse"):
        raise ValueError(f"consistency must be one of ['kl', 'mse'], got {consistency!r}")
    temperature = positive("temperature", temperature, "Use e.g. temperature: 4.0")
    check_weight("consistency_weight", consistency_weight)
    loss = SoftTargetKLLoss(temperature) if consistency == "kl" else ConsistencyMSELoss()
    return [
        LossTerm(HardLabelCrossEntropy(), name="ce"),
        LossTerm(loss, weight=consistency_weight, name="consistency", teacher="ema"),
    ]


def ramped_decay(decay: float, step: int) -> float:
    """``min(decay, 1 - 1 / (step + 1))``: Tarvainen & Valpola's ramp, so that early averages
    are not dominated by the random initialisation."""
    return min(decay, 1.0 - 1.0 / (step + 1))


class MeanTeacherDistillation(OwnKnowledgeModule):
    """The teacher is an exponential moving average (EMA) of the student's weights.

    After every optimizer step, :math:`\\theta' \\leftarrow d\\, \\theta' + (1 - d)\\, \\theta`
    with :math:`d = \\min(\\text{decay}, 1 - 1/(\\text{step} + 1))` (:func:`ramped_decay`);
    BatchNorm statistics are copied. The EMA
    (:class:`~kd_lightning.teachers.EMATeacher`) is the knowledge ``ema``; it records the last
    step it averaged, so under gradient accumulation it averages once per optimizer step and a
    resumed run takes exactly the averages of an uninterrupted one. Default objective: the
    hard-label CE plus ``consistency_weight`` times ``"kl"`` (:math:`T^2 \\mathrm{KL}(p'^T \\|
    p^T)`) or ``"mse"`` (squared distance of the probabilities, the paper's choice). The EMA is
    in the checkpoint (``ema.module.*``) and logged as ``{stage}/acc_ema``; the student is
    exported.

    Args:
        student: the network to train.
        decay: EMA decay d in [0, 1).
        temperature: T of the default ``"kl"`` consistency; default 1.
        consistency_weight: weight of the default consistency term; default 1.
        consistency: ``"kl"`` (default) or ``"mse"``.
        loss_terms: the objective over ``student`` and ``ema`` (replaces the default; then
            leave ``temperature``, ``consistency_weight`` and ``consistency`` unset).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (the student only).
        lr_scheduler: scheduler factory.
    """

    teacher_args = ("ema",)

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.99,
        temperature: float | None = None,
        consistency_weight: float | None = None,
        consistency: Literal["kl", "mse"] | None = None,
        loss_terms: list[LossTerm] | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay} (e.g. 0.99 or 0.999)")
        refuse_ignored({"temperature": temperature, "consistency_weight": consistency_weight,
                        "consistency": consistency}, loss_terms)  # fmt: skip
        if loss_terms is None:
            loss_terms = mean_teacher_terms(
                1.0 if temperature is None else temperature,
                1.0 if consistency_weight is None else consistency_weight,
                consistency or "kl",
            )
        built = instantiate(student) if isinstance(student, dict) else student
        super().__init__(models={"student": built, "ema": EMATeacher(built)}, loss_terms=None,
                         num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)  # fmt: skip
        if isinstance(student, dict):
            self.record_model_specs({"student": student})
        self.decay = decay
        self.set_objective(loss_terms)

    def metric_sources(self) -> list[str]:
        return ["ema"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # Called on every micro-batch; the EMA skips a step it has already averaged.
        step = self.global_step
        self.ema.update(self.student, ramped_decay(self.decay, step), step=step)


__all__ = [
    "CSKD",
    "PSKD",
    "BranchHead",
    "BranchSelfDistillation",
    "EMATeacher",
    "MeanTeacherDistillation",
    "byot_loss_terms",
    "mean_teacher_terms",
    "ramped_decay",
]
