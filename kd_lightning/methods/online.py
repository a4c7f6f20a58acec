"""Online distillation: a cohort of peers trained together, each teaching the others.

Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning"): every peer
k minimises its cross-entropy with the labels plus the mean KL divergence from each other
peer's (detached) prediction to its own,

.. math:: \\mathcal{L}_k = \\mathcal{L}_{CE}(z_k, y)
    + \\frac{1}{K - 1} \\sum_{j \\ne k} T^2\\, \\mathrm{KL}(p_j^T \\,\\|\\, p_k^T).

An optional on-the-fly ensemble teacher, the mean of the peers' logits (detached), adds
:math:`T^2 \\mathrm{KL}(p_{ens}^T \\| p_k^T)` to every peer, in the spirit of ONE (Lan, Zhu &
Gong 2018) and KDCL (Guo et al. 2020), which build a stronger teacher from the cohort itself.

The paper updates the peers in turn; here all peers take one step on the summed objective in
the same optimizer step. Since every peer only receives gradients from its own terms (the
others' predictions are detached), this is DML's objective with simultaneous updates.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.functional.soft_target import (
    IGNORE_INDEX,
    hard_label_cross_entropy,
    soft_target_kl,
)
from kd_lightning.methods.base import STAGES, DistillationModule, _default_optimizer
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import CHECKPOINT_KEY, STUDENT_PREFIX, output_logits


def make_accuracies(names: list[str], num_classes: int) -> nn.ModuleDict:
    """One micro accuracy per (stage, name), for logging ``{stage}/acc_{name}``."""
    return nn.ModuleDict(
        {
            f"{stage}_{name}": MulticlassAccuracy(
                num_classes, average="micro", ignore_index=IGNORE_INDEX
            )
            for stage in STAGES
            for name in names
        }
    )


def log_accuracy(
    module: DistillationModule,
    metrics: nn.ModuleDict,
    stage: str,
    name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
) -> None:
    metric = metrics[f"{stage}_{name}"]
    metric.update(logits.detach(), target)
    module.log(f"{stage}/acc_{name}", metric, on_step=False, on_epoch=True)


class MutualDistillation(DistillationModule):
    """Deep Mutual Learning: N >= 2 peers (any architectures) trained together from scratch.

    Logs ``{stage}/acc_peer<k>`` for every peer, ``{stage}/acc_ensemble`` for the mean of the
    peers' logits, and ``{stage}/acc`` for the exported peer. Every peer is in the checkpoint
    (``peers.<k>.*``); the exported one is written a second time under ``student.*`` with its
    spec, so :func:`~kd_lightning.teachers.load_student` and
    :class:`~kd_lightning.teachers.PretrainedTeacher` read a DML checkpoint like any other.

    Args:
        peers: the cohort, at least 2 modules returning logits over the same classes.
        temperature: softening temperature T of the mutual KL terms (the paper's is 1); the
            terms are multiplied by T^2.
        mutual_weight: weight of the mean KL from the other peers.
        ensemble_teacher: also distil from the mean of all peers' logits (detached).
        ensemble_weight: weight of the ensemble-teacher KL term.
        export_peer: which peer is the student for prediction, export and ``load_student``:
            an index, or ``"best"`` (highest validation accuracy at the latest validation).
        num_classes: number of classes (linked from the data by the CLI).
        optimizer: optimizer factory (one optimizer over every peer).
        lr_scheduler: scheduler factory.
    """

    student_arg = "peers"

    def __init__(
        self,
        peers: list[nn.Module],
        temperature: float = 1.0,
        mutual_weight: float = 1.0,
        ensemble_teacher: bool = False,
        ensemble_weight: float = 1.0,
        export_peer: int | Literal["best"] = 0,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        if peers is None or len(peers) < 2:
            count = 0 if peers is None else len(peers)
            raise ValueError(
                f"MutualDistillation needs a cohort of at least 2 peers, got {count}: add another "
                "model to `peers` (e.g. a second copy of the same architecture), or train a single "
                "model with kd_lightning.methods.Supervised"
            )
        built = [self.build_model(p) for p in peers]
        if len({id(p) for p in built}) != len(built):
            raise ValueError(
                "the same module object appears twice in `peers`: give each peer its own instance"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if mutual_weight < 0 or ensemble_weight < 0:
            raise ValueError("mutual_weight and ensemble_weight must be >= 0")
        if export_peer != "best" and not (
            isinstance(export_peer, int) and 0 <= export_peer < len(built)
        ):
            raise ValueError(
                f"export_peer must be 'best' or a peer index in 0..{len(built) - 1}, got {export_peer!r}"
            )
        self.peers = nn.ModuleList(built)
        if "peers" not in self.hparams:
            specs = [model_spec(p) for p in built]
            if all(s is not None for s in specs):
                self.hparams["peers"] = specs
        self.temperature = float(temperature)
        self.mutual_weight = float(mutual_weight)
        self.ensemble_teacher = ensemble_teacher
        self.ensemble_weight = float(ensemble_weight)
        self.export_peer = export_peer
        self.export_index = 0 if export_peer == "best" else int(export_peer)
        self._peer_outputs: list[torch.Tensor] | None = None

    @property
    def student(self) -> nn.Module:
        """The exported peer."""
        return self.peers[self.export_index]

    def named_output_models(self) -> list[tuple[str, nn.Module]]:
        return [(f"peer {i} (peers.{i})", p) for i, p in enumerate(self.peers)]

    def configure_metrics(self, num_classes: int) -> None:
        super().configure_metrics(num_classes)
        names = [f"peer{i}" for i in range(len(self.peers))] + ["ensemble"]
        self.cohort_metrics = make_accuracies(names, num_classes)

    def forward_models(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = [output_logits(p(batch["input"])) for p in self.peers]
        self._peer_outputs = logits
        return {"student": logits[self.export_index], "teacher": None, "peers": logits}

    def compute_losses(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        logits = outputs["peers"]
        target = batch["target"]
        ensemble = torch.stack([z.detach().float() for z in logits]).mean(0)
        losses: dict[str, torch.Tensor] = {}
        total = logits[0].new_zeros((), dtype=torch.float32)
        for k, z in enumerate(logits):
            ce = hard_label_cross_entropy(z, target)
            # soft_target_kl detaches its teacher argument: peer k learns from j, not j from k.
            mutual = torch.stack(
                [
                    soft_target_kl(z, other, self.temperature)
                    for j, other in enumerate(logits)
                    if j != k
                ]
            ).mean()
            losses[f"ce_peer{k}"] = ce
            losses[f"mutual_peer{k}"] = mutual
            total = total + ce + self.mutual_weight * mutual
            if self.ensemble_teacher:
                ens = soft_target_kl(z, ensemble, self.temperature)
                losses[f"ensemble_peer{k}"] = ens
                total = total + self.ensemble_weight * ens
        losses["loss"] = total
        return losses

    def log_metrics(
        self, stage: str, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        super().log_metrics(stage, student, teacher, target)
        logits, self._peer_outputs = self._peer_outputs, None
        if logits is None:
            return
        for k, z in enumerate(logits):
            log_accuracy(self, self.cohort_metrics, stage, f"peer{k}", z, target)
        ensemble = torch.stack([z.detach().float() for z in logits]).mean(0)
        log_accuracy(self, self.cohort_metrics, stage, "ensemble", ensemble, target)

    def on_validation_epoch_end(self) -> None:
        if self.export_peer != "best" or self.trainer.sanity_checking:
            return
        # Metric.compute() syncs across processes, so every rank picks the same peer.
        accuracies = torch.stack(
            [self.cohort_metrics[f"val_peer{k}"].compute() for k in range(len(self.peers))]
        )
        self.export_index = int(accuracies.argmax())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        prefix = f"peers.{self.export_index}."
        state = checkpoint["state_dict"]
        state.update(
            {
                STUDENT_PREFIX + k[len(prefix) :]: v
                for k, v in list(state.items())
                if k.startswith(prefix)
            }
        )
        specs = self.hparams.get("peers")
        meta = checkpoint[CHECKPOINT_KEY]
        if isinstance(specs, (list, tuple)) and isinstance(specs[self.export_index], dict):
            meta["student_spec"] = specs[self.export_index]
        else:
            meta["student_spec"] = model_spec(self.student)
        meta["export_index"] = self.export_index

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # student.* duplicates the exported peer for load_student; the module keeps peers.* only.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(STUDENT_PREFIX)]:
            del state[key]
        if self.export_peer == "best":  # an explicit index given at load time wins
            self.export_index = int(checkpoint.get(CHECKPOINT_KEY, {}).get("export_index", 0))
