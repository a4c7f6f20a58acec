"""DeepInversion: each loss term against a hand value or an independent construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.synthesis import (
    BatchNormStatistics,
    DeepInversion,
    balanced_classes,
    batchnorm_statistics_distance,
    channel_statistics,
    total_variation,
)


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


def test_total_variation_hand_values():
    x = torch.tensor([[0.0, 1.0], [3.0, 7.0]]).view(1, 1, 2, 2)
    # vertical differences 3, 6; horizontal 1, 4
    assert total_variation(x, power=2).item() == pytest.approx((9 + 36) / 2 + (1 + 16) / 2)
    assert total_variation(x, power=1).item() == pytest.approx((3 + 6) / 2 + (1 + 4) / 2)
    assert total_variation(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0


def test_channel_statistics_are_biased_per_channel():
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])  # (2, 2, 1, 2)
    mean, var = channel_statistics(x)
    assert torch.allclose(mean, torch.tensor([4.0, 1.0]))
    # channel 0 values 1, 3, 5, 7: population variance 5; channel 1: 0, 0, 2, 2 -> 1
    assert torch.allclose(var, torch.tensor([5.0, 1.0]))


def _inputs_of_bn_layers(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: captured.__setitem__(n, a[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return captured


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set each BN layer's running statistics to those of its input on ``x``, layer by layer
    (a layer's input depends only on the layers before it)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = channel_statistics(_inputs_of_bn_layers(model, x)[name])
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
    return model


def test_feature_loss_is_zero_when_batch_statistics_equal_running_statistics():
    x = torch.randn(16, 1, 6, 6)
    model = _calibrate(_bn_net(), x)
    with BatchNormStatistics(model) as statistics:
        model(x)
    assert statistics.loss().item() == pytest.approx(0.0, abs=1e-5)

    # Shifting the last layer's remembered mean by 0.5 in one channel and its variance by 0.3
    # in two channels costs exactly 0.5 + sqrt(2 * 0.3^2).
    model[4].running_mean[2] += 0.5
    model[4].running_var[[0, 5]] += 0.3
    with BatchNormStatistics(model) as statistics:
        model(x)
    assert statistics.loss().item() == pytest.approx(0.5 + math.sqrt(2 * 0.09), abs=1e-5)


def test_first_layer_weight_multiplies_the_first_term_only():
    model = _bn_net()
    x = torch.randn(8, 1, 6, 6)
    with BatchNormStatistics(model, first_layer_weight=10.0) as statistics:
        model(x)
    features = _inputs_of_bn_layers(model, x)
    first = batchnorm_statistics_distance(
        features["1"], model[1].running_mean, model[1].running_var
    )
    second = batchnorm_statistics_distance(
        features["4"], model[4].running_mean, model[4].running_var
    )
    assert statistics.loss().item() == pytest.approx(10 * first.item() + second.item(), rel=1e-5)


def test_hooks_exist_only_inside_the_block_and_bn_free_models_are_refused():
    model = _bn_net()
    with BatchNormStatistics(model):
        assert len(model[1]._forward_pre_hooks) == 1
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BatchNormStatistics(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_objective_is_the_weighted_sum_of_its_terms():
    model = _bn_net()
    synthesiser = DeepInversion(feature_weight=0.3, tv_weight=0.2, l2_weight=0.1, seed=0)
    x = torch.rand(6, 1, 6, 6)
    targets = {"class": torch.tensor([0, 1, 2, 0, 1, 2])}
    terms = synthesiser.objective(model, x, targets)
    ce = nn.functional.cross_entropy(model(x), targets["class"])
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["l2"].item() == pytest.approx(x.pow(2).mean().item(), rel=1e-6)
    expected = ce + 0.3 * terms["feature"] + 0.2 * terms["tv"] + 0.1 * terms["l2"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_balanced_classes():
    classes = balanced_classes(25, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(classes).tolist() == [5] * 5
    assert not torch.equal(classes, torch.arange(25) % 5)  # shuffled: batches mix classes


def test_synthesis_reduces_its_objective_and_leaves_the_teacher_untouched():
    # A "teacher" whose BN layers remember a data distribution that inputs in [0, 1] can reach.
    reference = (torch.rand(64, 1, 6, 6) > 0.6).float() * 0.8
    model = _calibrate(_bn_net(), reference).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synthesiser = DeepInversion(batch_size=12, steps=40, lr=0.1, tv_weight=0.1, seed=3)
    made = synthesiser.synthesise(model, num_samples=24, num_classes=3, input_shape=(1, 6, 6))
    # the objective of the first batch, before and after its optimisation, recomputed
    generator = torch.Generator().manual_seed(3)
    targets = synthesiser.draw_targets(model, 24, 3, generator)
    start = synthesiser.initial_inputs(
        (12, 1, 6, 6), torch.Generator().manual_seed(3 * 1_000_003 + 1), torch.device("cpu")
    )
    first = {k: v[:12] for k, v in targets.items()}
    model.eval()
    initial = synthesiser.objective(model, start, first)
    final = synthesiser.objective(model, made.inputs[:12], first)
    assert final["loss"] < 0.7 * initial["loss"]
    assert final["feature"] < 0.5 * initial["feature"]
    assert made.inputs.min() >= 0 and made.inputs.max() <= 1  # input_range [0, 1]
    assert torch.equal(made.classes, targets["class"])
    assert torch.allclose(made.teacher_logits, model(made.inputs), atol=1e-5)
    model.train()
    assert model.training and all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no weight or BN statistic changed


def test_synthesis_is_reproducible_from_its_seed():
    model = _bn_net()
    make = lambda seed: DeepInversion(batch_size=4, steps=3, jitter=1, seed=seed).synthesise(  # noqa: E731
        model, num_samples=6, num_classes=3, input_shape=(1, 6, 6)
    )
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.metadata["settings"]["seed"] == 1 and a.metadata["method"] == "deep_inversion"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"feature_weight": -1}, "feature_weight"),
        ({"tv_power": 3}, "tv_power"),
        ({"input_range": [1.0, 0.0]}, "input_range"),
        ({"init": "zeros"}, "init must be one of"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepInversion(**kwargs)
