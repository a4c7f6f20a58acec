"""Frozen teachers: knowledge sources that stay in eval mode, compute no gradients, never train.

A *knowledge source* turns a batch into knowledge: :meth:`FrozenTeacher.teach` returns
``{"logits": ...}`` (and, for special sources, ``"topk"`` or ``"log.<name>"`` statistics). The
method's base class calls it once per step and files the result under the source's name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a dict with ``logits``, or an object with ``.logits``.

    Raises:
        TypeError: no logits can be found; the message names the accepted forms.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
        "a dict with a 'logits' entry, or an object with a .logits attribute"
    )


def _plain(cls: type) -> bool:
    """Whether a FrozenTeacher subclass only loads (its outputs are its network's outputs)."""
    return cls.forward is FrozenTeacher.forward and cls.teach is FrozenTeacher.teach


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of tensors (Hugging Face style), else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: eval mode forever, ``requires_grad=False``, forward without autograd.

    ``.train()`` on the wrapper (or on any parent, as Lightning does at each epoch) leaves the
    wrapped module in eval mode, so dropout stays off and BatchNorm running statistics are never
    updated. Methods keep frozen teachers out of the optimizer and out of checkpoints.

    Args:
        module: the teacher network; its outputs must hold logits (see :func:`output_logits`).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, FrozenTeacher) and _plain(type(module)):
            module = module.module  # a plain wrapper: wrap its network once, not twice
        if not isinstance(module, nn.Module):
            raise TypeError(f"a teacher must be an nn.Module, got {type(module).__name__}")
        self.module = module
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Whatever is asked, the subtree stays in eval mode.
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @property
    def hook_root(self) -> nn.Module:
        """The module whose layers a loss term may hook (``teacher.<layer path>``)."""
        return self.module

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        """This teacher's knowledge of ``batch``: ``{"logits": (B, C) or (B, L, V)}``.

        Args:
            batch: the normalised batch (``input``, ``target``, ...).
            knowledge: what the step knows so far (the student's output under ``student``).
        """
        with torch.no_grad():
            return {"logits": output_logits(call_model(self.module, batch["input"]))}
