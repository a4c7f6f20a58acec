r"""KL divergence and entropy from log-probabilities, with ``0 log 0 = 0``.

A teacher logit of ``-inf`` (a masked class, a padded vocabulary entry) is a probability of
exactly 0. The textbook expression :math:`p (\log p - \log q)` evaluates to
``0 * (-inf - x) = NaN`` there, in the value and in the gradient. These helpers select the
term with ``torch.where`` *before* the product, so a zero-probability term contributes exactly
0 and sends a zero gradient, whatever the other side holds. A NaN input stays NaN (a broken
teacher is not hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.functional._precision import upcast


def softened_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dim, upcast (float64 stays float64).

    A ``-inf`` logit gives a log-probability of ``-inf`` (probability 0); a row whose every
    entry is ``-inf`` is no distribution and gives NaN.
    """
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`\sum_i p_i (\log p_i - \log q_i)` along ``dim``; terms with :math:`p_i = 0` are 0.

    Where :math:`p_i > 0` and :math:`q_i = 0` the term is :math:`+\infty`, as the divergence is.
    """
    p = log_p.exp()
    zero = p == 0
    diff = torch.where(zero, torch.zeros_like(log_p), log_p - log_q)
    return (p * diff).sum(dim)


def entropy_from_log_probs(log_p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`-\sum_i p_i \log p_i` along ``dim``, with :math:`0 \log 0 = 0`."""
    p = log_p.exp()
    safe = torch.where(p == 0, torch.zeros_like(log_p), log_p)
    return -(p * safe).sum(dim)
