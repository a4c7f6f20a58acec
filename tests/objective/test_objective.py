"""The objective language: sources, schedules, stages, the one evaluation loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.objective import (
    LinearRamp,
    LinearWarmup,
    LossTerm,
    Objective,
    Progress,
    StartAt,
    resolve_source,
)

MODELS = ["student", "teacher", "peer0", "peer1"]


def test_sources_resolve_to_knowledge_keys():
    assert resolve_source("logits", "student", MODELS) == "student"
    assert resolve_source("logits", "teacher", MODELS) == "teacher"
    assert resolve_source("peer1", "teacher", MODELS) == "peer1"
    assert resolve_source("stage2", "student", MODELS) == "student.stage2"
    assert resolve_source("teacher.layer1.0", "teacher", MODELS) == "teacher.layer1.0"
    assert resolve_source("topk", "teacher", MODELS) == "teacher.topk"


def test_schedules_by_hand():
    assert LinearWarmup(4)(Progress(epoch=0)) == 0.25
    assert LinearWarmup(4)(Progress(epoch=3)) == 1.0
    assert LinearWarmup(0)(Progress(epoch=0)) == 1.0
    assert StartAt(2)(Progress(epoch=1)) == 0.0 and StartAt(2)(Progress(epoch=2)) == 1.0
    assert LinearRamp(0.0, 0.8)(Progress(epoch=5, max_epochs=10)) == pytest.approx(0.4)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_weight_is_refused(weight):
    with pytest.raises(ValueError, match="must be >= 0"):
        LossTerm(HardLabelCrossEntropy(), weight=weight)


def test_evaluate_is_the_weighted_sum_and_stages_skip_terms():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    kd = LossTerm(SoftTargetKLLoss(2.0), weight=0.7, name="kd")
    ce = LossTerm(HardLabelCrossEntropy(), weight=0.3, name="ce", pretrain_epochs=1)
    objective = Objective([kd, ce])
    batch = {"input": None, "target": target}
    knowledge = {"student": s, "teacher": t}
    first = objective.evaluate(knowledge, batch, MODELS, Progress(epoch=0))
    assert set(first) == {"ce", "loss"}  # stage 1: only the term with pretrain_epochs
    later = objective.evaluate(knowledge, batch, MODELS, Progress(epoch=1))
    p = torch.softmax(t / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    ce_value = nn.functional.cross_entropy(s, target)
    assert later["loss"].item() == pytest.approx((0.7 * kl + 0.3 * ce_value).item(), rel=1e-5)


def test_a_term_reads_any_pair_of_sources():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    term = LossTerm(SoftTargetKLLoss(1.0), student="peer0", teacher="peer1")
    value = term({"peer0": a, "peer1": b}, {"input": None, "target": None}, MODELS)
    p = torch.softmax(b, -1)
    expected = (p * (p.log() - torch.log_softmax(a, -1))).sum(-1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_missing_knowledge_names_what_exists():
    term = LossTerm(SoftTargetKLLoss(1.0), teacher="ema")
    with pytest.raises(KeyError, match="knowledge has"):
        term({"student": torch.zeros(1, 2)}, {"input": None}, MODELS + ["ema"])


def test_duplicate_names_and_non_terms_are_refused():
    with pytest.raises(ValueError, match="unique"):
        Objective([LossTerm(HardLabelCrossEntropy()), LossTerm(HardLabelCrossEntropy())])
    with pytest.raises(TypeError, match="LossTerm"):
        Objective([HardLabelCrossEntropy()])
