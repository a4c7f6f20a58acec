"""Start-up checks that change no state: every module's mode, the RNG and all buffers survive.

A check runs the models on one example batch before any step. Dropout, BatchNorm statistics,
memory banks and random draws must not differ from a run without the check.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from: torch (CPU, CUDA), Python and NumPy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    # Plain Python values only: checkpoints are read with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and afterwards every submodule's own mode, every buffer and the
    random generators exactly as before (a user's frozen BatchNorm stays in eval mode)."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape != saved.shape:  # lazily sized buffers (observers, banks)
                    buffer.resize_(saved.shape)
                buffer.copy_(saved)
        set_rng_state(rng)


def check_class_count(
    name: str, logits: torch.Tensor, num_classes: int | None, reference: str | None = None
) -> int:
    """The class count of ``logits`` (last dim), refused when it differs from ``num_classes``.

    ``reference`` names the model ``num_classes`` was read from when neither the method nor the
    data gave it (plain DataLoaders): the message then names both models.
    """
    classes = int(logits.shape[-1])
    if num_classes is not None and classes != num_classes and reference is not None:
        raise ValueError(
            f"the {name} outputs {classes} logits but the {reference} outputs {num_classes}: "
            "build both for the task's classes (num_classes=<the number of classes in your "
            "labels>), and pass num_classes to the method so the labels are checked against it"
        )
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"the {name} outputs {classes} logits but the task has {num_classes} classes; build "
            f"the {name} with num_classes={num_classes} (or use a {name} checkpoint trained on "
            "this data)"
        )
    return classes
