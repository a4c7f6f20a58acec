"""DKD, logit standardization KD and DIST against hand-derived and loop-computed references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kd_lightning.functional.response import decoupled_kd, dist_loss, logit_standardization_kd
from kd_lightning.functional.soft_target import soft_target_kl
from kd_lightning.losses.response import DISTLoss, DKDLoss, LogitStandardizationKDLoss


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _dkd_reference(student, teacher, target, alpha, beta, temperature):
    """TCKD and NCKD from the paper's definitions, one sample and one class at a time."""
    total, count = 0.0, 0
    for z, v, t in zip(student.tolist(), teacher.tolist(), target.tolist(), strict=True):
        if t == -1:
            continue
        p_s = _softmax([x / temperature for x in z])
        p_t = _softmax([x / temperature for x in v])
        tckd = _kl([p_t[t], 1 - p_t[t]], [p_s[t], 1 - p_s[t]])
        hat_t = [p / (1 - p_t[t]) for i, p in enumerate(p_t) if i != t]
        hat_s = [p / (1 - p_s[t]) for i, p in enumerate(p_s) if i != t]
        total += alpha * tckd + beta * _kl(hat_t, hat_s)
        count += 1
    return total / count * temperature**2


def test_dkd_matches_paper_definitions_computed_per_class():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 6), 2 * torch.randn(5, 6)
    target = torch.tensor([0, 3, 5, 1, 2])
    expected = _dkd_reference(student, teacher, target, alpha=0.7, beta=2.5, temperature=3.0)
    got = decoupled_kd(student, teacher, target, alpha=0.7, beta=2.5, temperature=3.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_reformulates_kd_exactly():
    """Zhao et al. Eq. 7: KD = TCKD + (1 - p_t^T) NCKD, sample by sample and for the batch mean."""
    torch.manual_seed(1)
    temperature = 2.0
    student, teacher = torch.randn(4, 7), 3 * torch.randn(4, 7)
    target = torch.tensor([6, 0, 2, 2])
    kd_batch = soft_target_kl(student, teacher, temperature)
    tckd_batch = decoupled_kd(
        student, teacher, target, alpha=1.0, beta=0.0, temperature=temperature
    )
    weighted_nckd = 0.0
    for b in range(4):
        s, t, y = student[b : b + 1], teacher[b : b + 1], target[b : b + 1]
        p_t = torch.softmax(t / temperature, dim=-1)[0, y].item()
        # With beta = 1 - p_t^T, DKD *is* KD for this sample.
        dkd = decoupled_kd(s, t, y, alpha=1.0, beta=1.0 - p_t, temperature=temperature)
        assert dkd.item() == pytest.approx(soft_target_kl(s, t, temperature).item(), rel=1e-5)
        nckd = decoupled_kd(s, t, y, alpha=0.0, beta=1.0, temperature=temperature)
        weighted_nckd += (1.0 - p_t) * nckd.item() / 4
    assert kd_batch.item() == pytest.approx(tckd_batch.item() + weighted_nckd, rel=1e-5)


def test_dkd_ignores_unlabeled_samples():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([1, -1, 4, -1])
    labeled = torch.tensor([0, 2])
    full = decoupled_kd(student, teacher, target)
    subset = decoupled_kd(student[labeled], teacher[labeled], target[labeled])
    assert full.item() == pytest.approx(subset.item(), rel=1e-6)


def test_dkd_all_unlabeled_batch_is_zero_with_finite_gradient():
    student = torch.randn(3, 5, requires_grad=True)
    loss = DKDLoss()(student=student, teacher=torch.randn(3, 5), target=torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(student.grad).all()


def test_dkd_teacher_argmax_stands_in_for_missing_labels():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([1, -1, 4, -1])
    filled = torch.where(target == -1, teacher.argmax(dim=-1), target)
    got = DKDLoss(unlabeled="teacher_argmax")(student=student, teacher=teacher, target=target)
    assert got.item() == pytest.approx(decoupled_kd(student, teacher, filled).item(), rel=1e-6)


def test_dkd_stays_finite_for_a_saturated_teacher():
    """1 - p_t underflows in float32 here; the log-space TCKD and masked NCKD must not."""
    student = torch.randn(2, 4, requires_grad=True)
    teacher = torch.tensor([[200.0, 0.0, 1.0, -1.0], [0.0, 300.0, 0.0, 0.0]])
    loss = decoupled_kd(student, teacher, torch.tensor([0, 1]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_dkd_validation():
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=0)
    with pytest.raises(ValueError, match="teacher_argmax"):
        DKDLoss(unlabeled="drop")
    with pytest.raises(ValueError, match="target"):
        DKDLoss()(student=torch.randn(2, 3), teacher=torch.randn(2, 3))


def _zscore(values: list[float], unbiased: bool = True) -> list[float]:
    """Z-score with the sample (1/(C-1), the authors' code) or population (1/C) deviation."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if unbiased else statistics.pstdev(values)
    return [(v - mean) / std for v in values]


@pytest.mark.parametrize("unbiased", [True, False])
def test_logit_standardization_matches_loop_reference(unbiased):
    torch.manual_seed(4)
    tau = 2.0
    student, teacher = torch.randn(3, 5), 5 * torch.randn(3, 5) + 2
    expected = 0.0
    for z, v in zip(student.tolist(), teacher.tolist(), strict=True):
        p_t = _softmax([x / tau for x in _zscore(v, unbiased)])
        p_s = _softmax([x / tau for x in _zscore(z, unbiased)])
        expected += _kl(p_t, p_s) / 3
    expected *= tau**2
    got = logit_standardization_kd(student, teacher, temperature=tau, unbiased=unbiased)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logit_standardization_authors_value():
    """C = 3, z_s = (1, 2, 4), z_t = (3, 1, 2), tau = 2: 0.9517 with the authors' code (unbiased
    std, Tensor.std), 1.4322 with the population std. Both derived by hand below."""
    student = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    teacher = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    for unbiased, published in ((True, 0.9517), (False, 1.4322)):
        p_t = _softmax([x / 2 for x in _zscore([3.0, 1.0, 2.0], unbiased)])
        p_s = _softmax([x / 2 for x in _zscore([1.0, 2.0, 4.0], unbiased)])
        by_hand = 4 * _kl(p_t, p_s)
        assert by_hand == pytest.approx(published, abs=5e-5)
        loss = LogitStandardizationKDLoss(temperature=2.0, unbiased=unbiased)
        got = loss(student=student, teacher=teacher)
        assert got.item() == pytest.approx(by_hand, rel=1e-6)
    assert LogitStandardizationKDLoss().unbiased is True


def test_logit_standardization_ignores_logit_scale_and_shift():
    """The paper's point: the student need not match the teacher's logit range."""
    torch.manual_seed(5)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    loss = LogitStandardizationKDLoss(temperature=3.0)
    base = loss(student=student, teacher=teacher)
    moved = loss(student=7 * student - 3, teacher=0.2 * teacher + 11)
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    assert loss(student=5 * teacher + 1, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)


def _pearson_distance(a: list[float], b: list[float]) -> float:
    return 1.0 - statistics.correlation(a, b)


def test_dist_matches_loop_reference():
    torch.manual_seed(6)
    tau, beta, gamma = 2.0, 0.5, 3.0
    student, teacher = torch.randn(4, 5), 2 * torch.randn(4, 5)
    y_s = [_softmax([x / tau for x in row]) for row in student.tolist()]
    y_t = [_softmax([x / tau for x in row]) for row in teacher.tolist()]
    inter = statistics.fmean(_pearson_distance(s, t) for s, t in zip(y_s, y_t, strict=True))
    columns = range(5)
    intra = statistics.fmean(
        _pearson_distance([r[j] for r in y_s], [r[j] for r in y_t]) for j in columns
    )
    expected = tau**2 * (beta * inter + gamma * intra)
    got = dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_for_identical_predictions_and_linear_in_its_weights():
    torch.manual_seed(7)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    assert DISTLoss()(student=teacher, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    inter = DISTLoss(beta=1, gamma=0)(student=student, teacher=teacher)
    intra = DISTLoss(beta=0, gamma=1)(student=student, teacher=teacher)
    both = DISTLoss(beta=2, gamma=3)(student=student, teacher=teacher)
    assert both.item() == pytest.approx(2 * inter.item() + 3 * intra.item(), rel=1e-6)


def test_response_losses_reject_mismatched_logits():
    with pytest.raises(ValueError, match="same shape"):
        DISTLoss()(student=torch.randn(2, 3), teacher=torch.randn(2, 4))
    with pytest.raises(ValueError, match="beta"):
        DISTLoss(beta=-1)
