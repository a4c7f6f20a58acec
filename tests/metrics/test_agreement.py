"""Teacher-student metrics: values by hand, masked (-inf) teacher classes, per-token rows, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.metrics import TeacherStudentKL, TopOneAgreement

INF = float("inf")


def test_kl_metric_by_hand_over_batches():
    # Batch 1: uniform student, teacher (1/2, 1/2, 0) by a masked class: KL = ln 1.5.
    # Batch 2: identical logits (KL 0) and teacher (1, 0, 0) against uniform (KL ln 3).
    metric = TeacherStudentKL()
    metric.update(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -INF]]))
    metric.update(
        torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 2.0, 3.0], [5.0, -INF, -INF]]),
    )
    value = metric.compute()
    assert torch.isfinite(value)
    assert value.item() == pytest.approx((math.log(1.5) + 0.0 + math.log(3.0)) / 3, rel=1e-6)


def test_kl_metric_temperature_and_validation():
    # At T = 2, logits (0, 2 ln 3) are (1/4, 3/4) for the teacher; uniform student: KL =
    # 1/4 ln(1/2) + 3/4 ln(3/2).
    metric = TeacherStudentKL(temperature=2.0)
    metric.update(torch.zeros(1, 2), torch.tensor([[0.0, 2 * math.log(3.0)]]))
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert metric.compute().item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        TeacherStudentKL(temperature=0.0)


def test_per_token_logits_count_every_row():
    # (B, L, V) = (1, 2, 3): two rows; KL ln 1.5 and 0; agreement 1 of 2.
    student = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 3.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 0.0, -INF], [0.0, 3.0, 1.0]]])
    kl, agreement = TeacherStudentKL(), TopOneAgreement()
    kl.update(student, teacher)
    agreement.update(student, torch.tensor([[[0.0, 1.0, -INF], [0.0, 3.0, 1.0]]]))
    assert kl.compute().item() == pytest.approx(math.log(1.5) / 2, rel=1e-6)
    assert agreement.compute().item() == pytest.approx(0.5)


def test_agreement_with_masked_teacher_classes():
    # The masked class is never the teacher's top-1: rows agree where the student's argmax is
    # the teacher's best unmasked class.
    student = torch.tensor([[0.0, 0.0, 5.0], [0.0, 4.0, 1.0], [3.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, -INF], [-INF, 2.0, 1.0], [2.0, -INF, -INF]])
    metric = TopOneAgreement()
    metric.update(student, teacher)
    assert metric.compute().item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric_class", [TeacherStudentKL, TopOneAgreement])
def test_mismatched_shapes_are_an_error_naming_both(metric_class):
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 1, 10\).*squeeze"):
        metric_class().update(torch.randn(4, 10), torch.randn(4, 1, 10))
