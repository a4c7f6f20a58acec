"""``CachedTeacher``: replays teacher outputs stored once by the teacher cache.

The transfer set attaches the stored outputs to each batch (dense ``teacher_logits``, or sparse
``teacher_topk_values``/``teacher_topk_indices``). The cache's header records the temperature,
top-k and teacher digest it was built with; :meth:`CachedTeacher.check` compares them with the
loss terms and the configured teacher at start-up.
"""

from __future__ import annotations

from typing import Any

from torch import nn

DENSE_KEY = "teacher_logits"
TOPK_VALUES_KEY = "teacher_topk_values"
TOPK_INDICES_KEY = "teacher_topk_indices"


def batch_has_cache(batch: dict[str, Any]) -> bool:
    """Whether a batch carries cached teacher outputs."""
    return DENSE_KEY in batch or TOPK_VALUES_KEY in batch


class CachedTeacher(nn.Module):
    """A teacher that never runs: its knowledge is read from the batch.

    Args:
        header: the cache's recorded settings (``temperature``, ``topk``, ``teacher_digest``),
            when known; used by :meth:`check`.
    """

    def __init__(self, header: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.header = dict(header or {})

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        if not batch_has_cache(batch):
            raise KeyError(
                "the teacher is a cache but this batch carries no cached teacher outputs: attach "
                "the teacher cache to every split the method runs on (train and val)"
            )
        result: dict[str, Any] = {}
        if DENSE_KEY in batch:
            result["logits"] = batch[DENSE_KEY]
        if TOPK_VALUES_KEY in batch:
            result["topk"] = (batch[TOPK_VALUES_KEY], batch[TOPK_INDICES_KEY])
        return result

    def check(self, temperatures: dict[str, float]) -> None:
        """Refuse loss terms that read a top-k cache at another temperature than it was stored at.

        Args:
            temperatures: ``{term name: temperature}`` of the terms reading ``teacher.topk``.

        Raises:
            ValueError: naming both temperatures and the fix.
        """
        stored = self.header.get("temperature")
        if stored is None or not self.header.get("topk"):
            return
        for name, temperature in temperatures.items():
            if temperature is not None and abs(float(temperature) - float(stored)) > 1e-12:
                raise ValueError(
                    f"loss term {name!r} reads the top-k teacher cache at temperature "
                    f"{temperature}, but the cache stored its top-k probabilities at temperature "
                    f"{stored}: set the term's temperature to {stored}, or rebuild the cache at "
                    f"{temperature}"
                )
