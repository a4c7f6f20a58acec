"""``EMATeacher``: an exponential moving average of a model, as a knowledge source.

Tarvainen & Valpola (2017), "Mean teachers are better role models": after every optimizer step,
``theta' <- d * theta' + (1 - d) * theta``. The average is state of the run: it lives in the
checkpoint, and so does the optimizer step it last averaged (a buffer), so a resumed run takes
exactly the averages an uninterrupted run takes (also with gradient accumulation).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kd_lightning.teachers.frozen import call_model, output_logits


class EMATeacher(nn.Module):
    """A copy of a model that only changes by :meth:`update`.

    Always in eval mode, ``requires_grad=False`` (never in the optimizer), runs without
    autograd; unlike a :class:`~kd_lightning.teachers.FrozenTeacher` it is saved in checkpoints.

    Args:
        model: the model to copy (deep-copied; the original is not touched).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        # Optimizer step of the last average (-1: none yet); a buffer, so it is checkpointed.
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.long))
        super().train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @property
    def hook_root(self) -> nn.Module:
        return self.module

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            return {"logits": output_logits(call_model(self.module, batch["input"]))}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, step: int | None = None) -> bool:
        """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

        Args:
            model: the trained model.
            decay: the EMA decay ``d`` in [0, 1).
            step: the optimizer step this average belongs to; an update for a step already
                averaged is skipped (several batches per step under gradient accumulation).
                ``None``: always update.

        Returns:
            Whether the average was taken.
        """
        if step is not None:
            # One host read per optimizer step (not per batch) keeps resume exact; cheap.
            if int(self.last_step) == step:
                return False
            self.last_step.fill_(step)
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        return True
