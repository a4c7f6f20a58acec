r"""Token-level distillation from a per-token top-k teacher cache (language models).

The equation, the tail bucket and why it is used rather than renormalised top-k: see
:mod:`kd_lightning.functional.token_sparse`. Source of the divergences: as
:mod:`kd_lightning.losses.token` (Hinton et al. 2015, Kim & Rush 2016, Gu et al. 2024, Agarwal
et al. 2024, Wen et al. 2023); of the sparse teacher: Anshumann et al. (2025).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd_lightning.functional.token import TOKEN_IGNORE_INDEX
from kd_lightning.functional.token_sparse import sparse_token_divergence
from kd_lightning.losses.token import _TokenLoss
from kd_lightning.models.spec import records_init_args


@records_init_args
class SparseTokenDistillationLoss(_TokenLoss):
    r"""Per-token divergence between a top-k cached teacher and the student, the tail as one bucket.

    .. math:: \mathcal{L} = T^2 \sum_{b,t} w_{b,t}\, D(\tilde p_{b,t}, \tilde q_{b,t})

    with :math:`\tilde p, \tilde q` the teacher's and the student's next-token distributions
    coarsened onto the teacher's top-k tokens plus one bucket for the rest, D the
    ``objective`` and w the token weights of ``reduction`` (the dense
    :class:`~kd_lightning.losses.TokenDistillationLoss`'s weights, next-token shift included).
    With k equal to the vocabulary size it is that dense loss.

    The teacher is the pair ``(values, indices)`` of a :class:`~kd_lightning.data.TeacherCache`
    built with ``granularity: token`` and ``topk``; in an objective use
    ``LossTerm(SparseTokenDistillationLoss(...), teacher="topk")``. At start-up the method
    checks ``temperature`` (and ``topk`` when set) against the cache header: a mismatch fails
    naming both values. A cache built with ``selection: sampled`` holds the frequencies of k
    draws from the teacher instead (they sum to 1, so the bucket is empty): an unbiased
    teacher for ``objective="forward_kl"``, the only objective the start-up check accepts with
    it (Anshumann et al. 2025; :func:`~kd_lightning.functional.sampled_log_probs`).

    Args:
        objective: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"total_variation"``.
        beta: the JSD's interpolation in [0, 1] (0 forward KL, 1 reverse KL).
        temperature: T > 0; must be the temperature the cache stored its log-probabilities at.
        topk: the k this loss expects from the cache; ``None`` accepts the cache's k.
        scale_by_t2: multiply by T^2 (Hinton et al. 2015).
        shift: True for causal LMs (position t predicts token t+1), False for masked LMs.
        reduction: ``"token"`` (mean over kept tokens) or ``"sequence"``.
        ignore_index: label value of ignored tokens.

    Shapes: ``student`` logits ``(B, L, V)`` or ``(N, V)``; teacher values and indices
    ``(B, L, k)`` / ``(N, k)``; ``target`` and ``mask`` ``(B, L)`` / ``(N,)``. Returns a
    float32 scalar (float64 for float64 inputs).
    """

    def __init__(
        self,
        objective: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        topk: int | None = None,
        scale_by_t2: bool = True,
        shift: bool = True,
        reduction: str = "token",
        ignore_index: int = TOKEN_IGNORE_INDEX,
    ) -> None:
        super().__init__(objective, beta, temperature, scale_by_t2, shift, reduction, ignore_index)
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk must be None (any k) or a positive integer, got {topk!r}.")
        self.topk = topk

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: Sequence[torch.Tensor],
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(teacher, torch.Tensor) or len(teacher) != 2:
            raise TypeError(
                "SparseTokenDistillationLoss needs the teacher's top-k knowledge as (values, "
                "indices); got dense logits. Attach a TeacherCache with granularity: token and "
                "topk to the data and set the loss term's `teacher: topk`, or use "
                "TokenDistillationLoss for dense logits."
            )
        values, indices = teacher
        return sparse_token_divergence(
            student, values, indices, target, mask, topk=self.topk, **self.options()
        )

    def extra_repr(self) -> str:
        return self._describe(before_shift=f"topk={self.topk}, ")
