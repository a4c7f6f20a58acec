"""``PastPredictions``: the model's own logits from the previous epoch, as a knowledge source.

PS-KD (Kim, Ji, Yoon & Hwang 2021) softens each sample's label with the prediction the model
made for it one epoch earlier. This memory holds one row of logits per training sample (by the
batch's ``index``); it is state of the run, so it lives in the checkpoint and a resumed run
reads the rows an uninterrupted run reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_lightning.functional.self_knowledge import label_logits


class PastPredictions(nn.Module):
    """One row of logits per training sample, written after each training step.

    :meth:`teach` gives, for the batch's samples, the logits stored for them; a sample not seen
    yet, and every sample outside training (validation indices are not training indices), gets
    :func:`~kd_lightning.functional.self_knowledge.label_logits` (its one-hot label; its current
    logits when unlabeled). Buffers ``logits`` ``(N, C)`` and ``seen`` ``(N,)``, empty until
    :meth:`allocate`.

    Args:
        source: the knowledge name whose logits are remembered (and give the class count).
    """

    def __init__(self, source: str = "student") -> None:
        super().__init__()
        self.source = source
        self.register_buffer("logits", torch.zeros(0, 0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))

    @property
    def num_samples(self) -> int:
        return int(self.seen.shape[0])

    def allocate(self, num_samples: int, num_classes: int) -> None:
        """Empty memory for ``num_samples`` samples and ``num_classes`` classes (keeps the device)."""
        device = self.logits.device
        self.logits = torch.zeros(num_samples, num_classes, device=device)
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        current = knowledge[self.source]
        target = batch.get("target")
        if target is None:
            target = torch.full(current.shape[:1], -1, dtype=torch.long, device=current.device)
        fallback = label_logits(target, current)
        if not self.training:
            return {"logits": fallback}
        if self.num_samples == 0:
            raise RuntimeError(
                "PastPredictions is not allocated: call allocate(num_samples, num_classes) "
                "before training (PSKD does it in setup)"
            )
        index = batch["index"]
        stored = self.logits[index].to(fallback.dtype)
        return {"logits": torch.where(self.seen[index].unsqueeze(1), stored, fallback)}

    @torch.no_grad()
    def write(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember ``logits`` ``(B, C)`` (detached, float32) for the samples ``index`` ``(B,)``."""
        self.logits[index] = logits.detach().float()
        self.seen[index] = True
