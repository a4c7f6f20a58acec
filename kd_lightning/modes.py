"""Eval mode for a block, then every submodule's own mode back.

``model.train(was_training)`` after an evaluation restores the *root's* flag on every submodule:
a user's backbone kept in eval mode (frozen BatchNorm statistics) would train again, and its
running statistics move with every later batch. :func:`eval_mode` records each submodule's flag
and puts exactly those back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Every submodule of ``models`` in eval mode for the block; afterwards each one's own
    ``training`` flag as it was (``None`` entries are skipped)."""
    flags = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
