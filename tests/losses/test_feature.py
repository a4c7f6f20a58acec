"""FitNets, attention transfer, NST, FSP and VID against hand-worked cases and loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.functional.feature import (
    attention_transfer,
    flow_of_solution_procedure,
    neuron_selectivity_transfer,
)
from kd_lightning.losses.feature import (
    AttentionTransferLoss,
    FitNetsHintLoss,
    FSPLoss,
    NSTLoss,
    VIDLoss,
)


def test_fitnets_is_the_elementwise_mean_squared_error():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # squared errors 0, 4, 9, 0 -> mean 13 / 4
    assert FitNetsHintLoss()(student=student, teacher=teacher).item() == pytest.approx(3.25)


def test_fitnets_names_the_connector_fix_for_shape_mismatch():
    with pytest.raises(ValueError, match="connector"):
        FitNetsHintLoss()(student=torch.randn(2, 3, 4, 4), teacher=torch.randn(2, 5, 4, 4))


def test_attention_transfer_hand_worked():
    # Student map: mean_c A^2 = [1, 0] -> normalised [1, 0]; teacher [0, 4] -> [0, 1].
    student = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]]]])  # (1, 2, 1, 2)
    teacher = torch.tensor([[[[0.0, 2.0]], [[0.0, 2.0]], [[0.0, -2.0]]]])  # (1, 3, 1, 2)
    # difference [1, -1]: mean of squares = 1.
    assert AttentionTransferLoss()(student=student, teacher=teacher).item() == pytest.approx(1.0)


def _at_reference(student: torch.Tensor, teacher: torch.Tensor, p: float) -> float:
    total, count = 0.0, 0
    for s, t in zip(student, teacher, strict=True):
        q_s = [sum(abs(x) ** p for x in s[:, i].tolist()) / s.shape[0] for i in range(s.shape[1])]
        q_t = [sum(abs(x) ** p for x in t[:, i].tolist()) / t.shape[0] for i in range(t.shape[1])]
        n_s, n_t = math.sqrt(sum(x * x for x in q_s)), math.sqrt(sum(x * x for x in q_t))
        for a, b in zip(q_s, q_t, strict=True):
            total += (a / n_s - b / n_t) ** 2
            count += 1
    return total / count


def test_attention_transfer_matches_loop_reference_for_maps_and_attention():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    got = attention_transfer(student, teacher, p=2.0)
    expected = _at_reference(student.flatten(2), teacher.flatten(2), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Transformer attention (B, heads, N, N): heads are the channels, all N*N pairs positions.
    attn_s = torch.softmax(torch.randn(2, 2, 3, 3), dim=-1)
    attn_t = torch.softmax(torch.randn(2, 4, 3, 3), dim=-1)
    got = AttentionTransferLoss(p=1.0)(student=attn_s, teacher=attn_t)
    expected = _at_reference(attn_s.flatten(2), attn_t.flatten(2), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_tokens_reduce_the_last_dimension():
    torch.manual_seed(1)
    tokens_s, tokens_t = torch.randn(2, 5, 3), torch.randn(2, 5, 8)  # (B, N, D)
    got = AttentionTransferLoss(channel_dim=-1)(student=tokens_s, teacher=tokens_t)
    expected = _at_reference(tokens_s.transpose(1, 2), tokens_t.transpose(1, 2), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_is_invariant_to_activation_scale_and_rejects_other_sizes():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    loss = AttentionTransferLoss()
    assert loss(student=10 * student, teacher=teacher).item() == pytest.approx(
        loss(student=student, teacher=teacher).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="interpolate"):
        loss(student=torch.randn(2, 3, 8, 8), teacher=teacher)
    with pytest.raises(ValueError, match="channel_dim"):
        AttentionTransferLoss(channel_dim=0)


def _nst_reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Squared MMD with k(x, y) = (x.y)^2 by explicit double sums over channels."""

    def normalised_channels(feature):
        rows = feature.flatten(1).tolist()
        return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]

    def mean_kernel(a, b):
        return sum(sum(x * y for x, y in zip(u, v, strict=True)) ** 2 for u in a for v in b) / (
            len(a) * len(b)
        )

    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        f_s, f_t = normalised_channels(s), normalised_channels(t)
        total += mean_kernel(f_t, f_t) + mean_kernel(f_s, f_s) - 2 * mean_kernel(f_t, f_s)
    return total / student.shape[0]


def test_nst_matches_loop_reference():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 3, 2, 3), torch.randn(2, 4, 2, 3)
    got = neuron_selectivity_transfer(student, teacher)
    assert got.item() == pytest.approx(_nst_reference(student, teacher), rel=1e-5)


def test_nst_compares_channel_distributions():
    """MMD between sets of channels: zero for itself, blind to channel order and channel scale."""
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 3, 3, 3), torch.randn(2, 4, 3, 3)
    loss = NSTLoss()
    assert loss(student=teacher, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    base = loss(student=student, teacher=teacher).item()
    scaled = student[:, [2, 0, 1]] * torch.tensor([0.5, 3.0, 7.0])[None, :, None, None]
    assert loss(student=scaled, teacher=teacher).item() == pytest.approx(base, rel=1e-5)
    with pytest.raises(ValueError, match="spatial"):
        loss(student=torch.randn(2, 3, 4, 4), teacher=teacher)


def _fsp_reference(first: torch.Tensor, second: torch.Tensor) -> list[list[list[float]]]:
    b, m, h, w = first.shape
    n = second.shape[1]
    return [
        [
            [
                sum(
                    first[x, i, s, t].item() * second[x, j, s, t].item()
                    for s in range(h)
                    for t in range(w)
                )
                / (h * w)
                for j in range(n)
            ]
            for i in range(m)
        ]
        for x in range(b)
    ]


def test_fsp_matches_loop_reference():
    torch.manual_seed(5)
    s1, s2 = torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3)
    t1, t2 = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)  # teacher resolution may differ
    g_s, g_t = _fsp_reference(s1, s2), _fsp_reference(t1, t2)
    expected = (
        sum(
            (g_t[x][i][j] - g_s[x][i][j]) ** 2 for x in range(2) for i in range(2) for j in range(3)
        )
        / 2
    )
    got = flow_of_solution_procedure((s1, s2), [t1, t2])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_fsp_validates_pairs():
    loss = FSPLoss()
    good = (torch.randn(2, 2, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial"):
        loss(student=(torch.randn(2, 2, 4, 4), torch.randn(2, 3, 2, 2)), teacher=good)
    with pytest.raises(ValueError, match="channel"):
        loss(student=(torch.randn(2, 2, 4, 4), torch.randn(2, 5, 4, 4)), teacher=good)
    with pytest.raises(ValueError, match="pair"):
        loss(student=torch.randn(2, 2, 4, 4), teacher=good)


def test_vid_is_the_gaussian_negative_log_likelihood():
    torch.manual_seed(6)
    loss = VIDLoss(student_channels=3, teacher_channels=2, hidden_channels=4, init_variance=2.0)
    with torch.no_grad():
        loss.alpha.copy_(torch.tensor([0.3, -1.0]))
    student, teacher = torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 2)
    mean = loss.regressor(student).detach()
    variance = [math.log1p(math.exp(a)) + 1e-5 for a in (0.3, -1.0)]
    terms = [
        0.5 * math.log(variance[c])
        + (teacher[b, c, i, j].item() - mean[b, c, i, j].item()) ** 2 / (2 * variance[c])
        for b in range(2)
        for c in range(2)
        for i in range(2)
        for j in range(2)
    ]
    got = loss(student=student, teacher=teacher)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_vid_starts_at_init_variance_and_its_variance_gradient_vanishes_at_the_residual_variance():
    """d/d sigma_c^2 of the NLL is zero where sigma_c^2 = mean squared residual of channel c."""
    torch.manual_seed(7)
    loss = VIDLoss(student_channels=3, teacher_channels=2, init_variance=5.0)
    assert torch.allclose(loss.variance(), torch.full((2,), 5.0))
    student, teacher = torch.randn(4, 3), torch.randn(4, 2)  # vector features work too
    with torch.no_grad():
        residual = (teacher - loss.regressor(student[:, :, None, None])[:, :, 0, 0]).pow(2).mean(0)
        loss.alpha.copy_(torch.log(torch.expm1(residual - loss.eps)))
    loss(student=student, teacher=teacher).backward()
    assert loss.alpha.grad.abs().max().item() < 1e-6


def test_vid_validation():
    with pytest.raises(ValueError, match="student_channels"):
        VIDLoss(student_channels=0, teacher_channels=2)
    with pytest.raises(ValueError, match="init_variance"):
        VIDLoss(student_channels=2, teacher_channels=2, init_variance=0.0)
    loss = VIDLoss(student_channels=2, teacher_channels=3)
    with pytest.raises(ValueError, match="student_channels=2"):
        loss(student=torch.randn(1, 4, 2, 2), teacher=torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="spatial"):
        loss(student=torch.randn(1, 2, 4, 4), teacher=torch.randn(1, 3, 2, 2))


def test_attention_transfer_matches_normalised_map_definition():
    """Mean over channels or sum gives the same normalised map (paper uses the sum)."""
    torch.manual_seed(8)
    student, teacher = torch.randn(2, 3, 3, 3), torch.randn(2, 4, 3, 3)
    q_s = F.normalize(student.pow(2).sum(1).flatten(1), dim=1)
    q_t = F.normalize(teacher.pow(2).sum(1).flatten(1), dim=1)
    expected = (q_s - q_t).pow(2).mean()
    assert attention_transfer(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
