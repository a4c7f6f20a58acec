r"""Transformer distillation losses: hidden states, attention maps, token cross-entropy.

Modules over what forward hooks capture from transformer layers (see
:mod:`kd_lightning.features`), with the loss contract ``forward(*, student, teacher,
target=None, mask=None)``; ``mask`` is the batch's attention mask (a
:class:`~kd_lightning.objective.LossTerm` passes it), so padding never counts. The equations,
shapes and reductions are in :mod:`kd_lightning.functional.transformer`.

Layer maps (student layer i <- teacher layer j) are the term's source lists::

    - class_path: kd_lightning.objective.LossTerm
      init_args:
        loss: {class_path: kd_lightning.losses.HiddenStateMSELoss,
               init_args: {student_dim: 32, teacher_dim: 64}}
        student: [bert.encoder.layer.0, bert.encoder.layer.1]
        teacher: [bert.encoder.layer.1, bert.encoder.layer.3]

Sources: Sanh et al. (2019), DistilBERT (cosine loss on hidden states); Jiao et al. (2020),
TinyBERT (hidden-state MSE through a learned :math:`W_h`, attention-map MSE); Wang et al.
(2020), MiniLM (KL between attention distributions).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.functional.token import REDUCTIONS, TOKEN_IGNORE_INDEX
from kd_lightning.functional.transformer import (
    DIVERGENCES,
    Tensors,
    attention_map_loss,
    hidden_state_cosine,
    hidden_state_mse,
    token_cross_entropy,
)
from kd_lightning.models.spec import records_init_args


def _project(projection: nn.Module | None, student: Tensors) -> Tensors:
    if projection is None:
        return student
    if isinstance(student, torch.Tensor):
        return projection(student)
    return [projection(s) for s in student]


@records_init_args
class _HiddenStateLoss(nn.Module):
    uses_teacher = True

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError(
                "give both student_dim and teacher_dim (a learned projection W_h from the "
                "student's width to the teacher's) or neither"
            )
        self.projection = nn.Linear(student_dim, teacher_dim) if student_dim is not None else None


class HiddenStateMSELoss(_HiddenStateLoss):
    r"""TinyBERT's hidden-state loss: :math:`\mathrm{MSE}(H^S W_h, H^T)` over real tokens.

    Jiao et al. (2020), "TinyBERT", eq. 8 (and eq. 9 for the embedding layer): the student's
    hidden states ``(B, L, D_s)`` are projected by a learned :math:`W_h` (one, shared by all
    layer pairs of the term, as in the paper) to the teacher's width ``D_t`` and compared with
    the teacher's ``(B, L, D_t)``: the mean squared error over the tokens whose attention mask
    is 1 and the ``D_t`` features; a list of layers is a layer map and the pairs' losses are
    summed. :math:`W_h` trains with the student.

    Args:
        student_dim: the student's hidden size ``D_s``, for :math:`W_h`.
        teacher_dim: the teacher's hidden size ``D_t``; both ``None``: no projection (equal
            widths, or a connector on the term).
    """

    def forward(
        self,
        *,
        student: Tensors,
        teacher: Tensors,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return hidden_state_mse(_project(self.projection, student), teacher, mask)


class HiddenStateCosineLoss(_HiddenStateLoss):
    r"""DistilBERT's cosine loss: :math:`1 - \cos(h^S, h^T)` averaged over real tokens.

    Sanh et al. (2019), "DistilBERT", section 3: a cosine embedding loss aligns the directions
    of the student's and teacher's hidden states ``(B, L, D)`` (the last layer in the paper);
    tokens whose attention mask is 0 are left out. A list of layers is a layer map (summed).

    Args:
        student_dim: the student's hidden size, for a learned projection (optional).
        teacher_dim: the teacher's hidden size (give both or neither).
    """

    def forward(
        self,
        *,
        student: Tensors,
        teacher: Tensors,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return hidden_state_cosine(_project(self.projection, student), teacher, mask)


@records_init_args
class AttentionMapLoss(nn.Module):
    r"""Attention-map transfer between heads: TinyBERT's MSE or MiniLM's KL, padding masked.

    Jiao et al. (2020), "TinyBERT", eq. 7: :math:`\frac1h \sum_i \mathrm{MSE}(A^S_i, A^T_i)`
    over the heads' ``(L, L)`` maps (``divergence="mse"``); Wang et al. (2020), "MiniLM",
    eq. 3: the KL from the teacher's to the student's attention distribution of every head and
    query token (``divergence="kl"``). Maps ``(B, H, L, L)`` are the attention probabilities
    that a Hugging Face attention module returns as its second output (hook
    ``<attention module>:output.1``, e.g. ``bert.encoder.layer.0.attention.self:output.1``,
    ``transformer.h.0.attn:output.1``; build the model with ``attn_implementation="eager"``).
    Only real query rows and key columns (attention mask 1) count. A list of layers is a layer
    map (summed). Student and teacher need the same number of heads.

    Args:
        divergence: ``"mse"`` (TinyBERT) or ``"kl"`` (MiniLM).
    """

    uses_teacher = True

    def __init__(self, divergence: str = "mse") -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence

    def forward(
        self,
        *,
        student: Tensors,
        teacher: Tensors,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attention_map_loss(student, teacher, mask, self.divergence)


@records_init_args
class TokenCrossEntropyLoss(nn.Module):
    r"""Language-modelling cross-entropy on the labels, per token (no teacher).

    :math:`-\sum_{b,t} w_{b,t} \log q_{b,t}(y_{b,t+1})` for causal LMs (``shift=True``: the
    logits at position t are scored on label t+1, labels being the input ids, as Hugging Face
    does) or :math:`y_{b,t}` without the shift (masked LMs, token classification); ``w`` are
    the token weights of the token distillation losses (labels ``-100`` and padding dropped;
    ``reduction="token"`` the mean over kept tokens, ``"sequence"`` the mean of sequence
    means). Its exponential (token reduction) is the perplexity. The hard-label term of a
    language-model objective and the loss of a student trained alone.

    Args:
        shift: causal-LM next-token alignment.
        reduction: ``"token"`` or ``"sequence"``.
        ignore_index: label of ignored tokens.

    Shapes: ``student`` logits ``(B, L, V)``, ``target`` ``(B, L)``, ``mask`` ``(B, L)``.
    """

    uses_teacher = False

    def __init__(
        self, shift: bool = True, reduction: str = "token", ignore_index: int = TOKEN_IGNORE_INDEX
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.shift, self.reduction, self.ignore_index = bool(shift), reduction, int(ignore_index)

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: torch.Tensor | None = None,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return token_cross_entropy(
            student, target, mask, shift=self.shift, reduction=self.reduction,
            ignore_index=self.ignore_index,
        )  # fmt: skip
