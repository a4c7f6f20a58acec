"""Error text for a loss term that cannot run on the example batch: the term, the shapes of
both sides, and a connector that would reconcile them."""

from __future__ import annotations

from typing import Any

from kd_lightning.connectors import suggest_connector
from kd_lightning.objective import LossTerm


def explain_term_error(
    term: LossTerm, knowledge: dict[str, Any], models: Any, err: Exception
) -> str:
    message = f"loss term {term.name!r} cannot run on the example batch: {err}"
    if "teacher" in term.keys("teacher", models) and "teacher" not in knowledge:
        if "teacher.topk" in knowledge:  # a top-k cache holds no dense logits
            message += (
                ". The teacher is a top-k cache (sparse log-probabilities, no logits): read it "
                "with LossTerm(SparseSoftTargetKLLoss(temperature=<the cache's>), "
                "teacher='topk'), or build the cache without topk (dense logits)"
            )
    s_keys, t_keys = term.keys("student", models), term.keys("teacher", models)
    if len(s_keys) == 1 and len(t_keys) == 1 and term.connector is None:
        s, t = knowledge.get(s_keys[0]), knowledge.get(t_keys[0])
        if hasattr(s, "shape") and hasattr(t, "shape") and tuple(s.shape[1:]) != tuple(t.shape[1:]):
            s_shape, t_shape = tuple(s.shape), tuple(t.shape)
            message += (
                f". Student {s_keys[0]!r} gives {s_shape}, teacher {t_keys[0]!r} gives {t_shape}"
            )
            fix = suggest_connector(s_shape, t_shape)
            if fix is not None:
                message += f"; add to the term `connector: {fix}`"
    return message
