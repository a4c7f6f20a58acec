r"""Token-level distillation losses for language models (forward/reverse KL, GKD's JSD, TV).

Modules over per-token logits ``(B, L, V)`` (or ``(N, V)``) with the loss contract
``forward(*, student, teacher, target=None, mask=None)``: ``target`` are labels (``-100``
ignored), ``mask`` the attention mask. The equations, the masking and shift rules, the two
reductions and the ``-inf`` handling are in :mod:`kd_lightning.functional.token`; the
memory-bounded forms in :mod:`kd_lightning.functional.token_chunked`.

Sources: Hinton et al. (2015) and Kim & Rush (2016) (forward KL per token); Gu et al. (2024),
MiniLLM (reverse KL); Agarwal et al. (2024), GKD, eq. 1 (generalized JSD; ``beta=0`` is the
forward KL(teacher || student), ``beta=1`` the reverse KL(student || teacher), as in TRL's
``GKDTrainer``); Wen et al. (2023), f-divergence KD (total variation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.functional.token import (
    TOKEN_IGNORE_INDEX,
    check_token_options,
    token_divergence,
)
from kd_lightning.functional.token_chunked import (
    check_chunk_size,
    chunked_token_divergence,
    fused_linear_token_divergence,
)
from kd_lightning.models.spec import records_init_args


class _TokenLoss(nn.Module):
    """The options every token-level loss module stores, checked once by ``check_token_options``.

    ``objective``, ``beta``, ``temperature``, ``scale_by_t2``, ``shift``, ``reduction`` and
    ``ignore_index`` as in :class:`TokenDistillationLoss` (the dense loss) and
    :class:`~kd_lightning.losses.SparseTokenDistillationLoss` (the top-k one), which extend it.
    """

    uses_teacher = True
    _OPTIONS = (
        "objective",
        "beta",
        "temperature",
        "scale_by_t2",
        "shift",
        "reduction",
        "ignore_index",
    )

    def __init__(
        self,
        objective: str,
        beta: float,
        temperature: float,
        scale_by_t2: bool,
        shift: bool,
        reduction: str,
        ignore_index: int,
    ) -> None:
        super().__init__()
        check_token_options(objective, beta, temperature, reduction)
        self.objective = objective
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.scale_by_t2 = bool(scale_by_t2)
        self.shift = bool(shift)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)

    def options(self) -> dict:
        """The keyword arguments shared by the functional forms (the names in ``_OPTIONS``)."""
        return {name: getattr(self, name) for name in self._OPTIONS}

    def _describe(self, before_shift: str = "", end: str = "") -> str:
        """The ``extra_repr`` of the shared options, with a subclass's own ones spliced in."""
        beta = f", beta={self.beta}" if self.objective == "jsd" else ""
        return (
            f"objective={self.objective!r}{beta}, temperature={self.temperature}, "
            f"{before_shift}shift={self.shift}, reduction={self.reduction!r}{end}"
        )


@records_init_args
class TokenDistillationLoss(_TokenLoss):
    r"""Per-token divergence between teacher and student next-token distributions.

    .. math:: \mathcal{L} = T^2 \sum_{b,t} w_{b,t}\, D\big(\mathrm{softmax}(v_{b,t}/T),
        \mathrm{softmax}(z_{b,t}/T)\big)

    with D the ``objective`` and w the token weights of ``reduction`` over the kept tokens.

    Args:
        objective: ``"forward_kl"`` KL(teacher || student), ``"reverse_kl"``
            KL(student || teacher), ``"jsd"`` (GKD's generalized JSD with ``beta``) or
            ``"total_variation"``.
        beta: the JSD's interpolation in [0, 1]: 0 is the forward KL, 1 the reverse KL, 0.5 the
            symmetric JSD. Only ``"jsd"`` uses it.
        temperature: softening temperature T > 0 (1 for language models is common).
        scale_by_t2: multiply by T^2 (Hinton et al. 2015).
        shift: True for causal LMs (logits at position t predict token t+1: the last position
            and the first label are dropped); False for masked LMs and aligned ``(N, V)`` tokens.
        reduction: ``"token"``, the mean over all kept tokens of the batch, or ``"sequence"``,
            the mean over sequences of each sequence's mean over its kept tokens.
        ignore_index: label value of ignored tokens.
        crop_vocab: when student and teacher vocabulary sizes differ (padded embeddings of one
            tokenizer), compare the shared first ``min(V_s, V_t)`` entries instead of failing.
        chunk_size: None for the plain form; a number of tokens per chunk for the
            memory-bounded form (same value and gradient, full probabilities never held).

    Shapes: ``student`` and ``teacher`` logits ``(B, L, V)`` or ``(N, V)``; ``target`` and
    ``mask`` ``(B, L)`` / ``(N,)``. Returns a float32 scalar (float64 for float64 inputs).
    """

    _OPTIONS = (*_TokenLoss._OPTIONS, "crop_vocab")

    def __init__(
        self,
        objective: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        shift: bool = True,
        reduction: str = "token",
        ignore_index: int = TOKEN_IGNORE_INDEX,
        crop_vocab: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(objective, beta, temperature, scale_by_t2, shift, reduction, ignore_index)
        self.crop_vocab = bool(crop_vocab)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self,
        *,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.chunk_size is None:
            return token_divergence(student, teacher, target, mask, **self.options())
        return chunked_token_divergence(
            student, teacher, target, mask, chunk_size=self.chunk_size, **self.options()
        )

    def extra_repr(self) -> str:
        return self._describe(end=f", chunk_size={self.chunk_size}")


class _OneObjectiveTokenLoss(TokenDistillationLoss):
    """A :class:`TokenDistillationLoss` whose objective is fixed by the subclass (``OBJECTIVE``)."""

    OBJECTIVE = "forward_kl"

    def __init__(
        self,
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        shift: bool = True,
        reduction: str = "token",
        ignore_index: int = TOKEN_IGNORE_INDEX,
        crop_vocab: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            objective=self.OBJECTIVE,
            temperature=temperature,
            scale_by_t2=scale_by_t2,
            shift=shift,
            reduction=reduction,
            ignore_index=ignore_index,
            crop_vocab=crop_vocab,
            chunk_size=chunk_size,
        )


@records_init_args
class TokenForwardKLLoss(_OneObjectiveTokenLoss):
    """Forward KL(teacher || student) per token (word-level KD, Kim & Rush 2016); mass-covering.

    Args as :class:`TokenDistillationLoss`, without ``objective`` and ``beta``.
    """

    OBJECTIVE = "forward_kl"


@records_init_args
class TokenReverseKLLoss(_OneObjectiveTokenLoss):
    """Reverse KL(student || teacher) per token (MiniLLM, Gu et al. 2024); mode-seeking.

    Taken over the teacher's support: where a teacher logit is ``-inf`` the student's
    distribution is renormalised without that entry (the KL would be infinite otherwise).
    Args as :class:`TokenDistillationLoss`, without ``objective`` and ``beta``.
    """

    OBJECTIVE = "reverse_kl"


@records_init_args
class TokenGeneralizedJSDLoss(TokenDistillationLoss):
    r"""GKD's generalized JSD per token (Agarwal et al. 2024, eq. 1).

    :math:`\beta\, \mathrm{KL}(p \| m) + (1-\beta)\, \mathrm{KL}(q \| m)`,
    :math:`m = \beta p + (1-\beta) q` (p teacher, q student); ``beta=0`` is the forward KL
    (teacher || student) and ``beta=1`` the reverse KL (student || teacher), as in TRL.
    Args as :class:`TokenDistillationLoss`, without ``objective``.
    """

    def __init__(self, beta: float = 0.5, **options) -> None:
        super().__init__(objective="jsd", beta=beta, **options)


@records_init_args
class TokenTotalVariationLoss(_OneObjectiveTokenLoss):
    r"""Total variation distance :math:`\tfrac12 \sum_i |p_i - q_i|` per token (Wen et al. 2023).

    Bounded by 1 per token. Args as :class:`TokenDistillationLoss`, without ``objective`` and
    ``beta``; ``scale_by_t2`` is kept for uniformity (the T^2 argument is the KLs').
    """

    OBJECTIVE = "total_variation"


@records_init_args
class FusedLinearTokenDistillationLoss(TokenDistillationLoss):
    """Token distillation from the student's final hidden states and output layer, fused.

    The same loss as :class:`TokenDistillationLoss` on the logits
    ``student @ student_weight.T + student_bias``, computed chunk by chunk so that the student's
    full ``(N, V)`` logits never exist (Liger-Kernel's fused-linear idea, in plain torch).
    Gradients reach the hidden states, the weight and the bias; never the teacher.

    ``forward(*, student, teacher, target=None, mask=None, student_weight=None,
    student_bias=None, teacher_weight=None, teacher_bias=None)``: ``student`` are the hidden
    states ``(B, L, H)`` or ``(N, H)`` (the input of ``lm_head``), ``student_weight`` is
    ``lm_head.weight`` ``(V, H)``. ``teacher`` are the teacher's logits, or its final hidden
    states when ``teacher_weight`` (``(V_t, H_t)``) is given (then the teacher's logits never
    exist either). Either side may instead be a list ``[hidden, weight]`` or ``[hidden, weight,
    bias]``, which is what a :class:`~kd_lightning.objective.LossTerm` reading the output
    layer's input and parameters gives (a YAML objective)::

        - class_path: kd_lightning.objective.LossTerm
          init_args:
            student: ["lm_head:input", "lm_head:parameter.weight"]
            teacher: logits
            loss: {class_path: kd_lightning.losses.FusedLinearTokenDistillationLoss}

    Args: as :class:`TokenDistillationLoss`; ``chunk_size`` (tokens per chunk) defaults to
    ``ceil(N / 16)`` tokens, kept between 8M and 64M logits per chunk.
    """

    def forward(
        self,
        *,
        student: torch.Tensor | Sequence[torch.Tensor],
        teacher: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        student_weight: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        student, student_weight, student_bias = _output_layer(
            "student", student, student_weight, student_bias
        )
        teacher, teacher_weight, teacher_bias = _output_layer(
            "teacher", teacher, teacher_weight, teacher_bias
        )
        if student_weight is None:
            raise TypeError(
                "FusedLinearTokenDistillationLoss needs the student's output-layer weight: pass "
                "student_weight=lm_head.weight, or in a LossTerm read student: "
                "['lm_head:input', 'lm_head:parameter.weight'] (the hidden states and the weight)."
            )
        return fused_linear_token_divergence(
            student,
            student_weight,
            teacher,
            target,
            mask,
            student_bias=student_bias,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            chunk_size=self.chunk_size,
            **self.options(),
        )


def _output_layer(side: str, value, weight, bias) -> tuple:
    """``(hidden or logits, weight, bias)`` of one side given as a tensor or a list."""
    if isinstance(value, torch.Tensor):
        return value, weight, bias
    parts = list(value)
    if not 2 <= len(parts) <= 3 or weight is not None or bias is not None:
        raise TypeError(
            f"FusedLinearTokenDistillationLoss: the {side} as a list must be [hidden, weight] or "
            f"[hidden, weight, bias] (and then no {side}_weight/{side}_bias argument); got "
            f"{len(parts)} entries."
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None
