"""The objective language: loss terms over knowledge, and schedules over training progress."""

from kd_lightning.objective.schedule import (
    Constant,
    LinearRamp,
    LinearWarmup,
    Progress,
    Schedule,
    StartAt,
)
from kd_lightning.objective.term import LOGITS, TOPK, LossTerm, Objective, resolve_source

__all__ = [
    "LOGITS",
    "TOPK",
    "Constant",
    "LinearRamp",
    "LinearWarmup",
    "LossTerm",
    "Objective",
    "Progress",
    "Schedule",
    "StartAt",
    "resolve_source",
]
