"""Contrastive loss module: CRD (Tian, Krishnan & Isola, ICLR 2020, "Contrastive Representation Distillation").

Contract of :mod:`kd_lightning.losses` plus one argument: ``forward(*, student, teacher,
target=None, index)``, where ``index`` is the batch's ``index`` entry (each sample's position
in the transfer set), which addresses the memory banks. The NCE objective is in
:mod:`kd_lightning.functional.contrastive`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.distributed import gather_rows, mean_of_exp_log
from kd_lightning.functional._precision import upcast
from kd_lightning.functional.contrastive import _crd_core, sample_negatives
from kd_lightning.models.spec import records_init_args


@records_init_args
class CRDLoss(nn.Module):
    """Contrastive representation distillation with momentum memory banks (Tian et al., ICLR 2020).

    Two linear heads map the flattened student and teacher features to ``feat_dim`` and
    L2-normalise them. Each sample's embedding is contrasted with the other network's memory
    bank: its own row (the positive) against ``num_negatives`` rows drawn uniformly from the
    other samples, with the NCE critic ``h = (e^{<.,.>/T} / Z) / (e^{<.,.>/T} / Z + N/M)``;
    the two directions are summed.

    State: the heads are trainable (the method must optimise this module's parameters with
    the student). The memory banks (``n_data x feat_dim`` each) and the normalisers ``Z`` are
    buffers, saved in checkpoints. In training mode (``self.training``) each forward, after
    computing the loss, moves the rows ``index`` of each bank towards the new embeddings,
    ``normalize(momentum * old + (1 - momentum) * new)``; ``Z`` is estimated once, on the first
    training batch, and then kept fixed. In eval mode nothing changes (an unset ``Z`` is
    estimated from the batch at hand without being stored). Under DDP the rows of every
    process update every process's banks, and ``Z`` is the mean over the processes' first
    batches, so the state is the same on every rank (:mod:`kd_lightning.distributed`).

    Args:
        student_dim: features per sample of the student input (product of its non-batch dims).
        teacher_dim: features per sample of the teacher input.
        n_data: number of samples in the transfer set M (rows of each memory bank); ``index``
            must lie in ``[0, n_data)``.
        feat_dim: embedding width (paper: 128).
        num_negatives: negatives per sample N (paper: 16384); capped at ``n_data - 1``.
        nce_t: temperature of the critic (paper: 0.07).
        momentum: memory-bank momentum (paper: 0.5).
    """

    uses_teacher = True

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value, hint in (
            ("student_dim", student_dim, "the flattened width of the student feature"),
            ("teacher_dim", teacher_dim, "the flattened width of the teacher feature"),
            ("feat_dim", feat_dim, "the paper uses feat_dim: 128"),
            ("num_negatives", num_negatives, "the paper uses num_negatives: 16384"),
        ):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r} ({hint}).")
        if not (isinstance(n_data, int) and n_data >= 2):
            raise ValueError(
                f"n_data must be an int >= 2 (the transfer set size), got {n_data!r}. Link it "
                "to the data module's number of training samples."
            )
        if not nce_t > 0:
            raise ValueError(f"nce_t must be > 0, got {nce_t}. The paper uses nce_t: 0.07.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}. The paper uses 0.5.")
        self.n_data = n_data
        self.feat_dim = feat_dim
        self.num_negatives = min(num_negatives, n_data - 1)
        self.nce_t = float(nce_t)
        self.momentum = float(momentum)
        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)
        # Uniform entries with variance 1 / feat_dim: rows start with about unit norm.
        bound = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer("memory_student", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("log_normalizer", torch.zeros(2))
        self.register_buffer("normalizer_set", torch.zeros((), dtype=torch.bool))

    def _embed(self, head: nn.Linear, feature: torch.Tensor, name: str) -> torch.Tensor:
        x = feature.flatten(1)
        if x.shape[1] != head.in_features:
            raise ValueError(
                f"CRDLoss: the {name} feature {tuple(feature.shape)} flattens to {x.shape[1]} "
                f"values per sample but {name}_dim={head.in_features}. Set {name}_dim to the "
                "product of its non-batch dimensions."
            )
        return F.normalize(upcast(head(x.to(head.weight.dtype))), dim=1)

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if index is None:
            raise ValueError(
                "CRDLoss needs index (each sample's position in the transfer set) to address "
                "its memory banks. Pass index=batch['index']."
            )
        if index.shape != (student.shape[0],) or teacher.shape[0] != student.shape[0]:
            raise ValueError(
                f"CRDLoss: index {tuple(index.shape)}, student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)} must share the batch size B (index of shape (B,))."
            )
        index = index.long()
        v_s = self._embed(self.embed_student, student, "student")
        v_t = self._embed(self.embed_teacher, teacher.detach(), "teacher")
        negatives = sample_negatives(index, self.n_data, self.num_negatives)

        loss, log_z = _crd_core(
            v_s,
            v_t,
            self.memory_student,
            self.memory_teacher,
            index,
            negatives,
            self.nce_t,
            self.log_normalizer,
            self.normalizer_set,
        )
        if self.training:
            with torch.no_grad():
                # Under DDP every process applies every process's update, so the banks and Z
                # stay identical on all ranks (one process: the local batch, unchanged).
                first = mean_of_exp_log(log_z.detach())
                self.log_normalizer.copy_(torch.where(self.normalizer_set, log_z, first))
                self.normalizer_set.fill_(True)
                index, v_s, v_t = gather_rows(index, v_s.detach(), v_t.detach())
                self._update_memory(self.memory_student, index, v_s)
                self._update_memory(self.memory_teacher, index, v_t)
        return loss

    def _update_memory(
        self, memory: torch.Tensor, index: torch.Tensor, embedding: torch.Tensor
    ) -> None:
        mixed = memory[index] * self.momentum + embedding.detach().to(memory) * (1 - self.momentum)
        memory.index_copy_(0, index, F.normalize(mixed, dim=1))
