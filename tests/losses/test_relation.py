"""RKD, similarity preserving, correlation congruence and PKT: loop references and paper invariants."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.functional.relation import (
    correlation_congruence,
    probabilistic_knowledge_transfer,
    relational_kd,
    similarity_preserving,
)
from kd_lightning.losses.relation import (
    CorrelationCongruenceLoss,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)


def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _dot(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v, strict=True))


def _rkd_reference(student: torch.Tensor, teacher: torch.Tensor, wd: float, wa: float) -> float:
    def distance_potential(x):
        b = len(x)
        d = [[math.dist(x[i], x[j]) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def angle_potential(x):
        b = len(x)

        def unit(i, j):
            diff = [p - q for p, q in zip(x[i], x[j], strict=True)]
            norm = math.sqrt(_dot(diff, diff))
            return [v / norm for v in diff] if norm > 0 else [0.0] * len(diff)

        return {
            (i, j, k): _dot(unit(i, j), unit(k, j))
            for i in range(b)
            for j in range(b)
            for k in range(b)
        }

    s, t = student.flatten(1).tolist(), teacher.flatten(1).tolist()
    b = len(s)
    ds, dt = distance_potential(s), distance_potential(t)
    loss_d = sum(_huber(dt[i][j], ds[i][j]) for i in range(b) for j in range(b)) / b**2
    a_s, a_t = angle_potential(s), angle_potential(t)
    loss_a = sum(_huber(a_t[key], a_s[key]) for key in a_s) / b**3
    return wd * loss_d + wa * loss_a


def test_rkd_matches_loop_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), 0.3 * torch.randn(4, 2, 3)
    got = relational_kd(student, teacher, distance_weight=25.0, angle_weight=50.0)
    assert got.item() == pytest.approx(_rkd_reference(student, teacher, 25.0, 50.0), rel=1e-4)
    # Large differences exercise the linear branch of the Huber loss.
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [30.0, 30.0]])
    student = torch.tensor([[0.0, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.2]])
    got = relational_kd(student, teacher, distance_weight=1.0, angle_weight=0.0)
    assert got.item() == pytest.approx(_rkd_reference(student, teacher, 1.0, 0.0), rel=1e-4)


def test_rkd_is_invariant_to_scaling_translating_and_rotating_the_student():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, 5)
    loss = RKDLoss()
    base = loss(student=student, teacher=teacher).item()
    rotation, _ = torch.linalg.qr(torch.randn(4, 4))
    moved = 3.0 * student @ rotation + torch.randn(4)
    assert loss(student=moved, teacher=teacher).item() == pytest.approx(base, rel=1e-4)
    assert loss(student=2 * teacher, teacher=teacher).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_gradient_is_finite_with_duplicate_samples():
    """Zero distances (a sample repeated in the batch) must not produce NaN gradients."""
    student = torch.randn(3, 4)
    student = torch.cat([student, student[:1]]).requires_grad_(True)
    RKDLoss()(student=student, teacher=torch.randn(4, 4)).backward()
    assert torch.isfinite(student.grad).all()


def test_rkd_validation():
    with pytest.raises(ValueError, match="distance_weight"):
        RKDLoss(distance_weight=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        RKDLoss(distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(ValueError, match="same B"):
        RKDLoss()(student=torch.randn(3, 2), teacher=torch.randn(4, 2))


def _sp_reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised_gram(x):
        gram = [[_dot(a, b) for b in x] for a in x]
        return [[v / math.sqrt(_dot(row, row)) for v in row] for row in gram]

    g_s = normalised_gram(student.flatten(1).tolist())
    g_t = normalised_gram(teacher.flatten(1).tolist())
    b = len(g_s)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_similarity_preserving_matches_loop_reference():
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 2, 2, 2), torch.randn(3, 5)
    got = similarity_preserving(student, teacher)
    assert got.item() == pytest.approx(_sp_reference(student, teacher), rel=1e-5)


def test_similarity_preserving_is_zero_for_proportional_gram_matrices():
    """Student = 2 * teacher: Gram matrix x4, identical after row normalisation."""
    torch.manual_seed(3)
    teacher = torch.randn(4, 3, 2, 2)
    loss = SimilarityPreservingLoss()
    assert loss(student=2 * teacher, teacher=teacher).item() == pytest.approx(0.0, abs=1e-7)
    # A rotated (wider) embedding has the same Gram matrix too.
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    rotated = teacher.flatten(1) @ rotation
    assert loss(student=rotated, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(student=torch.randn(4, 7), teacher=teacher).item() > 1e-3


def _cc_reference(student, teacher, kernel, gamma, order) -> float:
    def correlation(x):
        x = [[v / math.sqrt(_dot(r, r)) for v in r] for r in x]
        if kernel == "bilinear":
            return [[_dot(a, b) for b in x] for a in x]
        return [
            [
                sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * _dot(a, b) ** p
                    for p in range(order + 1)
                )
                for b in x
            ]
            for a in x
        ]

    c_s = correlation(student.flatten(1).tolist())
    c_t = correlation(teacher.flatten(1).tolist())
    b = len(c_s)
    return sum((c_t[i][j] - c_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


@pytest.mark.parametrize(("kernel", "order"), [("gaussian", 2), ("gaussian", 0), ("bilinear", 2)])
def test_correlation_congruence_matches_loop_reference(kernel, order):
    torch.manual_seed(4)
    student, teacher = torch.randn(4, 3), torch.randn(4, 6)
    got = correlation_congruence(student, teacher, kernel=kernel, gamma=0.7, order=order)
    expected = _cc_reference(student, teacher, kernel, 0.7, order)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_correlation_congruence_taylor_converges_to_the_gaussian_rbf():
    """High order: the kernel is exp(-gamma ||a - b||^2) of the L2-normalised embeddings."""
    torch.manual_seed(5)
    student, teacher = torch.randn(5, 3), torch.randn(5, 4)

    def rbf(x):
        x = torch.nn.functional.normalize(x.double(), dim=1)
        return torch.exp(-0.4 * torch.cdist(x, x).pow(2))

    exact = (rbf(teacher) - rbf(student)).pow(2).mean().item()
    got = CorrelationCongruenceLoss(gamma=0.4, order=20)(student=student, teacher=teacher)
    assert got.item() == pytest.approx(exact, rel=1e-4)


def test_correlation_congruence_validation():
    with pytest.raises(ValueError, match="bilinear"):
        CorrelationCongruenceLoss(kernel="mmd")
    with pytest.raises(ValueError, match="order"):
        CorrelationCongruenceLoss(order=-1)


def _pkt_reference(student, teacher) -> float:
    def conditional(x):
        x = [[v / math.sqrt(_dot(r, r)) for v in r] for r in x]
        b = len(x)
        k = [[0.5 * (_dot(x[i], x[j]) + 1) if i != j else 0.0 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    p_s = conditional(student.flatten(1).tolist())
    p_t = conditional(teacher.flatten(1).tolist())
    b = len(p_s)
    total = sum(
        p_t[i][j] * math.log(p_t[i][j] / p_s[i][j]) for i in range(b) for j in range(b) if i != j
    )
    return total / b


def test_pkt_matches_loop_reference():
    torch.manual_seed(6)
    student, teacher = torch.randn(5, 3), torch.randn(5, 2, 2)
    got = probabilistic_knowledge_transfer(student, teacher)
    assert got.item() == pytest.approx(_pkt_reference(student, teacher), rel=1e-5)


def test_pkt_is_a_divergence_blind_to_per_sample_scale():
    torch.manual_seed(7)
    student, teacher = torch.randn(5, 3), torch.randn(5, 4)
    loss = PKTLoss()
    assert loss(student=teacher, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    base = loss(student=student, teacher=teacher).item()
    assert base > 0
    scales = torch.tensor([0.1, 1.0, 5.0, 2.0, 30.0])[:, None]
    assert loss(student=student * scales, teacher=teacher).item() == pytest.approx(base, rel=1e-5)


# Three samples: the student's are e1, e2, e1 (cosines 1, 0, 1), the teacher's all point one
# way (every cosine 1). Kernel K = (cos + 1) / 2: student [[1, .5, 1], [.5, 1, .5], [1, .5, 1]],
# teacher all ones.
PKT_STUDENT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
PKT_TEACHER = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [3.0, 3.0, 0.0]], dtype=torch.float64)


def test_pkt_paper_form_by_hand():
    # Without self-similarity, rows of p_s: (-, 1/3, 2/3), (1/2, -, 1/2), (2/3, 1/3, -); p_t is
    # 1/2 per neighbour. Row 0: 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8); row 1: 0; row 2 as
    # row 0. Averaged over the 3 samples: ln(9/8) / 3.
    got = PKTLoss()(student=PKT_STUDENT, teacher=PKT_TEACHER)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(math.log(9 / 8) / 3, rel=1e-9)


def test_pkt_authors_code_form_by_hand():
    # With self-similarity, rows of p_s: (.4, .2, .4), (.25, .5, .25), (.4, .2, .4); p_t = 1/3
    # everywhere. Each row's sum of 1/3 ln((1/3) / p_s) is -1/3 ln(27 prod p_s); the sum over
    # the 3 x 3 entries is divided by B^2 = 9. eps = 1e-7 moves the value by ~1e-7 relative.
    rows = [(0.4, 0.2, 0.4), (0.25, 0.5, 0.25), (0.4, 0.2, 0.4)]
    by_hand = sum(-math.log(27 * math.prod(row)) / 3 for row in rows) / 9
    got = PKTLoss(form="authors_code")(student=PKT_STUDENT, teacher=PKT_TEACHER)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def test_pkt_authors_code_form_of_a_pair():
    # B = 2: the paper form has one neighbour per sample (p = 1 for both networks, loss 0);
    # the authors' form compares (2/3, 1/3) with (1/2, 1/2): 2 * 1/2 ln(9/8) / 4.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert PKTLoss()(student=student, teacher=teacher).item() == pytest.approx(0.0, abs=1e-7)
    got = PKTLoss(form="authors_code")(student=student, teacher=teacher)
    assert got.item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


def test_pkt_form_validation():
    with pytest.raises(ValueError, match="authors_code"):
        PKTLoss(form="author")
