"""Online distillation: a cohort of peers trained together, each teaching the others.

Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning"): every peer
k minimises its cross-entropy with the labels plus the mean KL divergence from each other
peer's (detached) prediction to its own,

.. math:: \\mathcal{L}_k = \\mathcal{L}_{CE}(z_k, y)
    + \\frac{1}{K - 1} \\sum_{j \\ne k} T^2\\, \\mathrm{KL}(p_j^T \\,\\|\\, p_k^T).

An optional on-the-fly ensemble teacher, the mean of the peers' logits (detached), adds
:math:`T^2 \\mathrm{KL}(p_{ens}^T \\| p_k^T)` to every peer, in the spirit of ONE (Lan, Zhu &
Gong 2018) and KDCL (Guo et al. 2020), which build a stronger teacher from the cohort itself.

The objective is a list of :class:`~kd_lightning.objective.LossTerm` over the knowledge
``peer0, peer1, ...`` (each peer's logits) and ``ensemble``; ``loss_terms`` replaces it, with
any loss. The paper updates the peers in turn; here all peers take one step on the summed
objective in the same optimizer step. Since every peer only receives gradients from its own
terms (soft-target losses detach their teacher side), this is DML's objective with
simultaneous updates.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from kd_lightning.artifact import CHECKPOINT_KEY
from kd_lightning.data.batch import normalise_batch
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.base import DistillationModule, default_optimizer
from kd_lightning.methods.checks import check_class_count, untouched
from kd_lightning.objective import LossTerm
from kd_lightning.validation import non_negative, positive

ENSEMBLE = "ensemble"
"""Knowledge name of the mean of the peers' detached logits."""


def mutual_learning_terms(
    num_peers: int,
    temperature: float = 1.0,
    mutual_weight: float = 1.0,
    ensemble_weight: float = 0.0,
) -> list[LossTerm]:
    """DML's objective as loss terms: per peer k, ``ce_peer<k>`` on the labels, one
    ``mutual_peer<k>_from_peer<j>`` soft-target term per other peer j (weight
    ``mutual_weight / (K - 1)``: the mean over the others), and, if ``ensemble_weight > 0``,
    ``ensemble_peer<k>`` from the cohort's mean logits.

    Raises:
        ValueError: fewer than 2 peers, a negative weight or a temperature that is not > 0.
    """
    if num_peers < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {num_peers}")
    mutual_weight = non_negative("mutual_weight", mutual_weight)
    ensemble_weight = non_negative("ensemble_weight", ensemble_weight)
    temperature = positive("temperature", temperature, "Use e.g. temperature: 3.0")
    peers = [f"peer{k}" for k in range(num_peers)]
    terms = [LossTerm(HardLabelCrossEntropy(), name=f"ce_{p}", student=p) for p in peers]
    for peer in peers:
        if mutual_weight > 0:
            terms += [
                LossTerm(SoftTargetKLLoss(temperature), weight=mutual_weight / (num_peers - 1),
                         name=f"mutual_{peer}_from_{other}", student=peer, teacher=other)
                for other in peers if other != peer
            ]  # fmt: skip
        if ensemble_weight > 0:
            terms.append(
                LossTerm(SoftTargetKLLoss(temperature), weight=ensemble_weight,
                         name=f"ensemble_{peer}", student=peer, teacher=ENSEMBLE)
            )  # fmt: skip
    return terms


class MutualDistillation(DistillationModule):
    """Deep Mutual Learning: N >= 2 peers (any architectures) trained together from scratch.

    Knowledge of a step: ``peer<k>`` (each peer's logits, hooked layers as ``peer<k>.<layer>``)
    and ``ensemble`` (mean of the detached peer logits, float32). Logs ``{stage}/acc_peer<k>``,
    ``{stage}/acc_ensemble`` and ``{stage}/acc`` for the exported peer. Every peer is in the
    checkpoint (``peers.<k>.*``); the student artifact points at the exported one, so
    :func:`~kd_lightning.teachers.load_student` and
    :class:`~kd_lightning.teachers.PretrainedTeacher` read a DML checkpoint like any other.

    Args:
        peers: the cohort, at least 2 modules returning logits over the same classes.
        loss_terms: the objective over ``peer<k>`` and ``ensemble`` (replaces the default; then
            leave ``temperature``, ``mutual_weight``, ``ensemble_teacher`` and
            ``ensemble_weight`` unset).
        temperature: T of the default mutual (and ensemble) KL terms, multiplied by T^2;
            default 1 (the paper's).
        mutual_weight: weight of each peer's mean KL from the other peers; default 1.
        ensemble_teacher: add the ensemble-teacher term to the default objective.
        ensemble_weight: weight of the ensemble-teacher term; default 1.
        export_peer: which peer is the student for prediction, export and ``load_student``:
            an index, or ``"best"`` (highest validation accuracy at the latest validation).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (one optimizer over every peer).
        lr_scheduler: scheduler factory.
    """

    student_args = ("peers",)
    teacher_args = ()

    def __init__(
        self,
        peers: list[nn.Module],
        loss_terms: list[LossTerm] | None = None,
        temperature: float | None = None,
        mutual_weight: float | None = None,
        ensemble_teacher: bool | None = None,
        ensemble_weight: float | None = None,
        export_peer: int | Literal["best"] = 0,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        count = 0 if peers is None else len(peers)
        if count < 2:
            raise ValueError(
                f"MutualDistillation needs a cohort of at least 2 peers, got {count}: add another "
                "model to `peers` (e.g. a second copy of the same architecture), or train a single "
                "model with kd_lightning.methods.Supervised"
            )
        if export_peer != "best" and not (
            isinstance(export_peer, int) and not isinstance(export_peer, bool)
            and 0 <= export_peer < count
        ):  # fmt: skip
            raise ValueError(
                f"export_peer must be 'best' or a peer index in 0..{count - 1}, got {export_peer!r}"
            )
        defaults = {"temperature": temperature, "mutual_weight": mutual_weight,
                    "ensemble_teacher": ensemble_teacher, "ensemble_weight": ensemble_weight}  # fmt: skip
        if ensemble_weight is not None and not ensemble_teacher:
            raise ValueError(
                "ensemble_weight is set but ensemble_teacher is not: set ensemble_teacher: true "
                "to add the ensemble-teacher term, or leave ensemble_weight unset"
            )
        if loss_terms is None:
            loss_terms = mutual_learning_terms(
                count,
                temperature=1.0 if temperature is None else temperature,
                mutual_weight=1.0 if mutual_weight is None else mutual_weight,
                ensemble_weight=(1.0 if ensemble_weight is None else ensemble_weight)
                if ensemble_teacher else 0.0,
            )  # fmt: skip
        elif any(v is not None for v in defaults.values()):
            given = sorted(k for k, v in defaults.items() if v is not None)
            raise ValueError(
                f"{given} only build the default objective, and loss_terms replaces it: set the "
                "temperature and weights on your loss terms (the ensemble teacher is the "
                f"knowledge {ENSEMBLE!r}, e.g. teacher: {ENSEMBLE}) and leave {given} unset"
            )
        names = [f"peer{k}" for k in range(count)] + [ENSEMBLE]
        for term in loss_terms:
            _check_term_sources(term, names)
        super().__init__(
            models={"peers": peers},
            loss_terms=loss_terms,
            num_classes=num_classes,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        self.export_peer = export_peer
        self.export_index = 0 if export_peer == "best" else int(export_peer)

    # ------------------------------------------------------------------ knowledge
    @property
    def peer_names(self) -> list[str]:
        return [f"peer{k}" for k in range(len(self.peers))]

    def knowledge_names(self) -> list[str]:
        """Every knowledge name a loss term may read: the peers and ``ensemble``."""
        return [*self.sources, ENSEMBLE]

    @property
    def exported_name(self) -> str:
        return f"peer{self.export_index}"

    def forward_knowledge(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        knowledge = super().forward_knowledge(batch, stage)
        peers = [knowledge[name].detach().float() for name in self.peer_names]
        knowledge[ENSEMBLE] = torch.stack(peers).mean(0)
        return knowledge

    def metric_sources(self) -> list[str]:
        return [*self.peer_names, ENSEMBLE]

    # ------------------------------------------------------------------ start-up
    def check_example(self, batch: Any, stage: str = "fit") -> None:
        # Every peer's class count first: the ensemble cannot average disagreeing peers.
        batch = normalise_batch(batch)
        with untouched(self):
            classes = self.num_classes
            for name in self.peer_names:
                logits = self.run_source(name, batch, {})[name]
                classes = check_class_count(f"{name} ({self.sources[name]})", logits, classes)
        super().check_example(batch, stage)

    # ------------------------------------------------------------------ exported peer
    def on_validation_epoch_end(self) -> None:
        if self.export_peer != "best" or self.trainer.sanity_checking:
            return
        if not self.metrics_service.ready:
            return
        collection = self.metrics_service.student["val_metrics"]
        # Metric.compute() syncs across processes, so every rank picks the same peer.
        accuracies = torch.stack([collection[f"acc_{name}"].compute() for name in self.peer_names])
        self.export_index = int(accuracies.argmax())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["export_index"] = self.export_index

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.export_peer == "best":  # an explicit index given at load time wins
            self.export_index = int(checkpoint.get(CHECKPOINT_KEY, {}).get("export_index", 0))


def _check_term_sources(term: LossTerm, names: list[str]) -> None:
    """Refuse a term that reads knowledge DML does not make (e.g. the default ``logits``)."""
    peers = [n for n in names if n != ENSEMBLE]
    bad = [
        key
        for side in ("student", "teacher")
        for key in term.keys(side, names)
        if key not in names and key.partition(".")[0] not in peers
    ]
    if bad:
        raise ValueError(
            f"loss term {term.name!r} reads {bad}, which MutualDistillation does not make: its "
            f"knowledge is {names} and hooked peer layers ('peer0.<layer>'); set the term's "
            "student and teacher, e.g. student: peer0, teacher: peer1"
        )
