"""``CachedTeacher``: replays teacher outputs stored once by the teacher cache.

The transfer set attaches the stored outputs to each batch (dense ``teacher_logits``, or sparse
``teacher_topk_values``/``teacher_topk_indices``: ``(B, k)`` per sample, ``(B, L, k)`` per token
for language models). Dense logits become the ``teacher`` knowledge, the top-k pair
``teacher.topk`` (``LossTerm(..., teacher="topk")``). The cache's header records the temperature,
top-k and teacher digest it was built with; the method's start-up checks compare them with the
loss terms and the configured teacher
(:func:`~kd_lightning.methods.checks.check_teacher_cache`).
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
    """A teacher that never runs: its knowledge is read from the batch."""

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
