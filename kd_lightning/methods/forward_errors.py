"""One sentence for a model that cannot run on the example batch at start-up.

Before any step the method runs every model on one example batch
(:meth:`~kd_lightning.methods.DistillationModule.check_example`). When a model's own forward
fails there (an MLP built for 8x8 inputs given 7x7: torch's "mat1 and mat2 shapes cannot be
multiplied (16x49 and 64x8)"; a CNN built for 1 channel given 3), the error names which model
failed, its class, the input shape it was given and the fix; torch's error stays as the cause.
Errors this library raises on purpose (a teacher cache's refusal, ...) pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_ZOO_DIR = str(Path(__file__).resolve().parents[1] / "models") + os.sep


class ExampleForwardError(ValueError):
    """A model's forward failed on the example batch at start-up (the cause is torch's error)."""


def describe_input(value: Any) -> str:
    """The shape (and dtype) of a model input: a tensor, or a dict/sequence of tensors."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{tuple(value.shape)} ({dtype})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_input(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_input(v) for v in value) + "]"
    return type(value).__name__


def describe_model(model: nn.Module) -> str:
    """``MLP``, or ``PretrainedTeacher of SmallCNN`` for a wrapper with a ``module``."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return f"{type(model).__name__} of {type(inner).__name__}"
    return type(model).__name__


def _raised_on_purpose(error: BaseException) -> bool:
    """Raised by this library's own code (not its model zoo, whose failures are torch's)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename
    return where.startswith(_PACKAGE_DIR) and not where.startswith(_ZOO_DIR)


@contextmanager
def explain_forward_failure(name: str, model: nn.Module, batch: dict[str, Any]) -> Iterator[None]:
    """Re-raise a failure of ``model``'s forward on the example ``batch`` as one sentence.

    Args:
        name: the knowledge name of the model (``student``, ``teacher``, ``peer1``, ...).
        model: the model run.
        batch: the normalised example batch (its ``input`` is described).

    Raises:
        ExampleForwardError: naming the model, its class, the input shape and the fix, from
            the original error. Out-of-memory errors and this library's own errors pass.
    """
    try:
        yield
    except Exception as err:
        if isinstance(err, torch.OutOfMemoryError) or _raised_on_purpose(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        inputs = batch.get("input") if isinstance(batch, dict) else None
        sample = ""
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
            sample = f" (one sample: {tuple(inputs.shape[1:])})"
        raise ExampleForwardError(
            f"the {name} ({describe_model(model)}) cannot run on the data: given an input batch "
            f"of shape {describe_input(inputs)}, its forward failed ({type(err).__name__}: "
            f"{reason}). The model's input size must match the data{sample}: build the {name} "
            "for these inputs (e.g. MLP's in_features, a CNN's in_channels, a text model's "
            "vocabulary), or give it data of the shape it was built for."
        ) from err
