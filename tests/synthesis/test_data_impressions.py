"""Data Impressions: similarity matrix, Dirichlet concentration and objective against the paper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.synthesis import (
    DataImpressions,
    class_similarity_matrix,
    dirichlet_concentration,
    find_classifier,
)


def test_class_similarity_matrix_hand_values():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    # cosine rows: [1, 0, c], [0, 1, c], [c, c, 1]; min-max per row
    expected = torch.tensor([[1.0, 0.0, c], [0.0, 1.0, c], [0.0, 0.0, 1.0]])
    assert torch.allclose(class_similarity_matrix(weight), expected, atol=1e-6)


def test_similarity_ignores_template_norms_and_has_unit_diagonal():
    weight = torch.randn(6, 5)
    scaled = weight * torch.tensor([1.0, 3.0, 0.1, 7.0, 2.0, 0.5]).unsqueeze(1)
    similarity = class_similarity_matrix(scaled)
    assert torch.allclose(similarity, class_similarity_matrix(weight), atol=1e-6)
    assert torch.allclose(similarity.diagonal(), torch.ones(6))
    assert similarity.min(dim=1).values.abs().max() < 1e-6


def test_dirichlet_concentration_is_beta_times_similarity_with_a_floor():
    similarity = torch.tensor([[1.0, 0.0, 0.5], [0.25, 1.0, 0.0], [0.0, 0.75, 1.0]])
    alpha = dirichlet_concentration(similarity, beta=0.1, min_similarity=1e-3)
    expected = 0.1 * torch.tensor([[1.0, 1e-3, 0.5], [0.25, 1.0, 1e-3], [1e-3, 0.75, 1.0]])
    assert torch.allclose(alpha, expected)
    with pytest.raises(ValueError, match="beta"):
        dirichlet_concentration(similarity, beta=0.0)


def _linear_teacher(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[1]), nn.ReLU())
    classifier = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        classifier.weight.copy_(weight)
    model.append(classifier)
    return model.eval()


def test_sampled_soft_targets_follow_the_papers_dirichlet():
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    teacher = _linear_teacher(weight)
    synthesiser = DataImpressions(betas=[1.0, 0.1], seed=0)
    targets = synthesiser.draw_targets(teacher, 16000, 4, torch.Generator().manual_seed(0))
    similarity = class_similarity_matrix(weight).clamp_min(1e-3)
    assert torch.bincount(targets["class"]).tolist() == [4000] * 4
    assert torch.allclose(targets["soft_target"].sum(dim=1), torch.ones(16000), atol=1e-5)
    for beta in (1.0, 0.1):
        chosen = targets["beta"] == beta
        assert chosen.sum() == 8000  # the scales split every class equally
        for k in range(4):
            rows = targets["soft_target"][chosen & (targets["class"] == k)]
            alpha = beta * similarity[k]
            # E[Dir(alpha)] = alpha / sum(alpha); Var_i = m_i (1 - m_i) / (sum(alpha) + 1)
            mean = alpha / alpha.sum()
            std = (mean * (1 - mean) / (alpha.sum() + 1) / len(rows)).sqrt()
            assert ((rows.mean(dim=0) - mean).abs() < 5 * std + 1e-4).all(), (beta, k)


def test_objective_is_the_soft_cross_entropy_at_temperature():
    torch.manual_seed(0)
    teacher = _linear_teacher(torch.randn(3, 4))
    synthesiser = DataImpressions(temperature=20.0)
    x = torch.rand(5, 1, 2, 2)
    y = torch.distributions.Dirichlet(torch.ones(3)).sample((5,))
    terms = synthesiser.objective(teacher, x, {"soft_target": y})
    reference = F.cross_entropy(teacher(x) / 20.0, y)  # torch's probability-target CE
    assert terms["loss"].item() == pytest.approx(reference.item(), rel=1e-6)


def test_synthesis_reduces_the_cross_entropy():
    torch.manual_seed(0)
    # logits affine in the input with a full-rank weight: every soft target is reachable
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    synthesiser = DataImpressions(
        temperature=2.0, batch_size=12, steps=100, lr=0.1, input_range=None, seed=1
    )
    made = synthesiser.synthesise(teacher, num_samples=12, num_classes=3, input_shape=(1, 2, 2))
    targets = synthesiser.draw_targets(teacher, 12, 3, torch.Generator().manual_seed(1))
    start = synthesiser.initial_inputs(
        (12, 1, 2, 2), torch.Generator().manual_seed(1 * 1_000_003 + 1), torch.device("cpu")
    )
    initial = synthesiser.objective(teacher, start, targets)["loss"].item()
    final = synthesiser.objective(teacher, made.inputs, targets)["loss"].item()
    entropy = (
        -(targets["soft_target"] * targets["soft_target"].clamp_min(1e-12).log()).sum(1).mean()
    )
    # the cross-entropy cannot go below the targets' entropy; most of the gap is closed
    assert final < initial
    assert final - entropy.item() < 0.5 * (initial - entropy.item())


def test_find_classifier():
    teacher = _linear_teacher(torch.randn(3, 4))
    assert find_classifier(teacher, 3) is teacher[3]
    assert find_classifier(teacher, 3, layer="3") is teacher[3]
    with pytest.raises(ValueError, match="linear layers are"):
        find_classifier(teacher, 3, layer="head")
    with pytest.raises(ValueError, match="with 3 outputs"):
        find_classifier(teacher, 3, layer="1")
    with pytest.raises(ValueError, match="no nn.Linear with 7 outputs"):
        find_classifier(teacher, 7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"betas": []}, "betas"),
        ({"betas": [1.0, -0.1]}, "betas"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataImpressions(**kwargs)
