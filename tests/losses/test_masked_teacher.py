"""A teacher logit of -inf (a masked class, a padded vocabulary entry) is a probability of 0.

Every response loss and the multi-teacher combination must give a finite value and finite
student gradients, equal to the value derived by hand with that class's probability set to 0
(the convention 0 log 0 = 0).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kd_lightning.functional.ensemble import (
    combine_teachers,
    ensemble_teacher_logits,
    normalized_entropy,
    teacher_weights,
)
from kd_lightning.functional.response import dist_loss
from kd_lightning.functional.soft_target import soft_target_kl
from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl, topk_log_probs
from kd_lightning.losses import (
    DISTLoss,
    DKDLoss,
    LogitMatchingMSELoss,
    LogitStandardizationKDLoss,
    SoftTargetKLLoss,
    SparseSoftTargetKLLoss,
)

INF = float("inf")
LN15, LN2, LN3 = math.log(1.5), math.log(2.0), math.log(3.0)


def _value_and_grad(loss_fn, student: torch.Tensor) -> tuple[float, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    value = loss_fn(student)
    value.backward()
    assert torch.isfinite(value), value
    assert torch.isfinite(student.grad).all(), student.grad
    return value.item(), student.grad


def test_soft_target_kl_issue_example_and_gradient():
    # p = (1/2, 1/2, 0), q = (1/3, 1/3, 1/3): KL = 2 * 1/2 * ln(3/2); times T^2 = 16.
    teacher = torch.tensor([[0.0, 0.0, -INF]])
    value, grad = _value_and_grad(
        lambda s: SoftTargetKLLoss(4.0)(student=s, teacher=teacher), torch.zeros(1, 3)
    )
    assert value == pytest.approx(16 * LN15, rel=1e-6)
    # d/dz = T^2 (q - p) / T = 4 (q - p).
    torch.testing.assert_close(grad, 4 * torch.tensor([[1 / 3 - 0.5, 1 / 3 - 0.5, 1 / 3]]))


def test_soft_target_kl_per_token_rows():
    # (B, L, V) = (1, 2, 3): row 1 as above (ln 1.5); row 2 p = (1, 0, 0): KL = ln 3.
    teacher = torch.tensor([[[0.0, 0.0, -INF], [0.0, -INF, -INF]]])
    value, _ = _value_and_grad(lambda s: soft_target_kl(s, teacher, 4.0), torch.zeros(1, 2, 3))
    assert value == pytest.approx(16 * (LN15 + LN3) / 2, rel=1e-6)


def test_student_masked_where_the_teacher_is_masked_gives_zero_terms():
    # Both mask class 2: p = q = (1/2, 1/2, 0); 0 log(0/0) counts as 0, so the KL is 0.
    masked = torch.tensor([[0.0, 0.0, -INF]])
    value, grad = _value_and_grad(lambda s: soft_target_kl(s, masked, 2.0), masked)
    assert value == 0.0
    assert grad.abs().max() == 0


@pytest.mark.parametrize("k", [2, 3])
def test_sparse_soft_target_with_a_masked_class(k: int):
    # k = 2 keeps (1/2, 1/2) and an empty rest bucket; k = 3 also keeps the masked class with a
    # log-probability of -inf. Both are the dense value 16 ln 1.5.
    values, indices = topk_log_probs(torch.tensor([[0.0, 0.0, -INF]]), k, 4.0)
    loss = SparseSoftTargetKLLoss(4.0)
    value, _ = _value_and_grad(
        lambda s: loss(student=s, teacher=(values, indices)), torch.zeros(1, 3)
    )
    assert value == pytest.approx(16 * LN15, rel=1e-6)


def test_sparse_soft_target_masked_entry_next_to_a_rest_bucket():
    # Top-2 of 4 classes: class 0 with p = 1/2, class 2 masked (p = 0); rest bucket 1/2 over
    # classes {1, 3}. Uniform student: q_0 = 1/4, q_rest = 1/2. KL = 1/2 ln 2 + 0 + 0.
    values = torch.tensor([[math.log(0.5), -INF]])
    indices = torch.tensor([[0, 2]])
    value, _ = _value_and_grad(
        lambda s: sparse_soft_target_kl(s, values, indices, temperature=1.0), torch.zeros(1, 4)
    )
    assert value == pytest.approx(0.5 * LN2, rel=1e-6)


@pytest.mark.parametrize(
    ("teacher", "target", "alpha", "beta", "by_hand"),
    [
        # Target 0: b_T = (1/2, 1/2), b_S = (1/3, 2/3): TCKD = 1/2 ln(3/2) + 1/2 ln(3/4);
        # non-target teacher over {1, 2} = (1, 0), student (1/2, 1/2): NCKD = ln 2.
        ([0.0, 0.0, -INF], 0, 1.0, 8.0, 16 * (0.5 * math.log(1.125) + 8 * LN2)),
        # Masked target: b_T = (0, 1), b_S = (1/3, 2/3): TCKD = ln(3/2); NCKD over {0, 1}: 0.
        ([0.0, 0.0, -INF], 2, 1.0, 8.0, 16 * LN15),
        # Every non-target class masked: b_T = (1, 0): TCKD = ln 3; no non-target
        # distribution, NCKD = 0 (its KD weight 1 - p_t is 0).
        ([0.0, -INF, -INF], 0, 1.0, 8.0, 16 * LN3),
    ],
)
def test_dkd_with_masked_classes(teacher, target, alpha, beta, by_hand):
    loss = DKDLoss(alpha=alpha, beta=beta, temperature=4.0)
    value, _ = _value_and_grad(
        lambda s: loss(student=s, teacher=torch.tensor([teacher]), target=torch.tensor([target])),
        torch.zeros(1, 3),
    )
    assert value == pytest.approx(by_hand, rel=1e-6)


def test_logit_standardization_uses_the_finite_entries():
    # Teacher (1, 3, -inf): mean 2, unbiased std sqrt(2) over the two finite entries, so
    # Z / tau = (-a, a, -inf) with a = 1 / (2 sqrt 2). Constant student: Z = 0, q = 1/3.
    a = 1 / (2 * math.sqrt(2))
    p = [math.exp(-a) / (math.exp(-a) + math.exp(a)), math.exp(a) / (math.exp(-a) + math.exp(a))]
    by_hand = 4 * (sum(x * math.log(x) for x in p) + LN3)
    teacher = torch.tensor([[1.0, 3.0, -INF]], dtype=torch.float64)
    value, _ = _value_and_grad(
        lambda s: LogitStandardizationKDLoss(temperature=2.0)(student=s, teacher=teacher),
        torch.zeros(1, 3, dtype=torch.float64),
    )
    assert value == pytest.approx(by_hand, rel=1e-6)


def test_logit_standardization_masked_value_with_a_non_constant_student():
    # Student (0, 1, 2): mean 1, unbiased std 1, Z / tau = (-1/2, 0, 1/2).
    a = 1 / (2 * math.sqrt(2))
    p = [math.exp(-a), math.exp(a)]
    p = [x / sum(p) for x in p]
    q = [math.exp(x) for x in (-0.5, 0.0, 0.5)]
    q = [x / sum(q) for x in q]
    by_hand = 4 * (p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]))
    teacher = torch.tensor([[1.0, 3.0, -INF]])
    value, _ = _value_and_grad(
        lambda s: LogitStandardizationKDLoss(temperature=2.0)(student=s, teacher=teacher),
        torch.tensor([[0.0, 1.0, 2.0]]),
    )
    assert value == pytest.approx(by_hand, rel=1e-5)


def test_logit_matching_leaves_masked_entries_out():
    # 1/2 ((0 - 1)^2 + (0 - 2)^2) = 2.5; gradient z - v on the kept entries, 0 on the masked.
    teacher = torch.tensor([[1.0, -INF, 2.0]])
    value, grad = _value_and_grad(
        lambda s: LogitMatchingMSELoss()(student=s, teacher=teacher), torch.zeros(1, 3)
    )
    assert value == pytest.approx(2.5)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0, -2.0]]))


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) if v != -INF else 0.0 for v in values]
    return [e / sum(exps) for e in exps]


def test_dist_with_masked_classes_matches_loop_reference():
    student = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [0.0, 0.3, 0.1]])
    teacher = torch.tensor([[2.0, 0.0, -INF], [-INF, 1.0, 0.5], [0.2, -0.4, 1.0]])
    y_s = [_softmax(row) for row in student.tolist()]
    y_t = [_softmax(row) for row in teacher.tolist()]

    def distance(a, b):
        return 1.0 - statistics.correlation(a, b)

    inter = statistics.fmean(distance(s, t) for s, t in zip(y_s, y_t, strict=True))
    intra = statistics.fmean(distance([r[j] for r in y_s], [r[j] for r in y_t]) for j in range(3))
    value, _ = _value_and_grad(lambda s: DISTLoss()(student=s, teacher=teacher), student)
    assert value == pytest.approx(inter + intra, rel=1e-5)
    assert dist_loss(student, teacher).item() == pytest.approx(value)


def test_ensemble_entropy_and_weights_with_masked_classes():
    # Teacher 0 on sample 0: p = (1/2, 1/2, 0), entropy ln 2; teacher 1: uniform, ln 3.
    logits = torch.tensor([[[0.0, 0.0, -INF]], [[0.0, 0.0, 0.0]]])
    torch.testing.assert_close(normalized_entropy(logits), torch.tensor([[LN2 / LN3], [1.0]]))
    w0 = 1 / (1 + math.exp(LN2 - LN3))  # softmax(-H) over the two teachers
    torch.testing.assert_close(teacher_weights(logits, "entropy"), torch.tensor([[w0], [1 - w0]]))


def test_ensemble_combination_with_masked_classes():
    logits = torch.tensor([[[0.0, 0.0, -INF]], [[1.0, 2.0, 3.0]]])
    # A teacher of weight 0 contributes nothing, never 0 * -inf = NaN.
    torch.testing.assert_close(
        combine_teachers(logits, torch.tensor([[0.0], [1.0]]), "logits"),
        torch.tensor([[1.0, 2.0, 3.0]]),
    )
    # Positive weight: the class is masked in the logit mixture.
    mixed = combine_teachers(logits, torch.tensor([[0.5], [0.5]]), "logits")
    torch.testing.assert_close(mixed, torch.tensor([[0.5, 1.0, -INF]]))
    # Probability mixture: both teachers mask class 2 -> log 0 = -inf, a probability of 0.
    both = torch.tensor([[[0.0, 0.0, -INF]], [[0.0, LN3, -INF]]])
    probs = combine_teachers(both, torch.tensor([[0.5], [0.5]]), "probabilities")
    torch.testing.assert_close(probs, torch.tensor([[math.log(3 / 8), math.log(5 / 8), -INF]]))
    # End to end: the KL to that mixture at T = 1, uniform student:
    # 3/8 ln(9/8) + 5/8 ln(15/8).
    combined, covered, _ = ensemble_teacher_logits(both, space="probabilities")
    assert covered.all()
    value, _ = _value_and_grad(lambda s: soft_target_kl(s, combined, 1.0), torch.zeros(1, 3))
    assert value == pytest.approx(3 / 8 * math.log(9 / 8) + 5 / 8 * math.log(15 / 8), rel=1e-6)


def test_a_nan_teacher_is_not_hidden():
    # -inf is a mask; NaN is a broken teacher and must stay visible.
    teacher = torch.tensor([[0.0, float("nan"), 1.0]])
    assert torch.isnan(soft_target_kl(torch.zeros(1, 3), teacher, 2.0))
