"""Saliencies, global masks, checkpoint round trip and schedules of the pruning core."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.compression import (
    apply_masks,
    channel_saliency,
    effective_parameters,
    exact_hessian_diagonal,
    global_prune_masks,
    load_pruned_state_dict,
    magnitude_saliency,
    make_pruning_permanent,
    obd_saliency,
    select_parameters,
    sparsity_by_parameter,
    sparsity_of,
    sparsity_schedule,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.conv(x)))


def test_saliencies_equal_hand_values():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    h = torch.tensor([[4.0, 1.0], [2.0, 0.0]])
    # 0.5 * h * w^2
    assert torch.equal(obd_saliency(w, h), torch.tensor([[2.0, 2.0], [0.25, 0.0]]))
    assert torch.equal(magnitude_saliency(w), torch.tensor([[1.0, 2.0], [0.5, 3.0]]))
    assert torch.equal(channel_saliency(obd_saliency(w, h)), torch.tensor([4.0, 0.25]))
    assert torch.equal(channel_saliency(w, dim=1), torch.tensor([1.5, 1.0]))
    with pytest.raises(ValueError, match="differs from weight shape"):
        obd_saliency(w, h[0])


def test_global_masks_prune_exact_count_of_lowest_saliencies():
    saliencies = {
        "a": torch.tensor([[5.0, 0.1], [3.0, 0.4]]),
        "b": torch.tensor([0.2, 9.0, 0.3, 7.0, 1.0, 0.05]),
    }
    masks = global_prune_masks(saliencies, 0.5)  # 10 entries -> prune the 5 lowest
    assert masks["a"].dtype == torch.bool
    assert torch.equal(masks["a"], torch.tensor([[True, False], [True, False]]))
    assert torch.equal(masks["b"], torch.tensor([False, True, False, True, True, False]))
    assert sum(int((~m).sum()) for m in masks.values()) == 5
    # Global, not per layer: a tensor whose saliencies are all low can lose everything.
    low_high = {"low": torch.full((4,), 0.01), "high": torch.arange(1.0, 5.0)}
    masks = global_prune_masks(low_high, 0.5)
    assert not masks["low"].any() and masks["high"].all()
    assert all(m.all() for m in global_prune_masks(saliencies, 0.0).values())


def test_structured_masks_remove_whole_lowest_channels():
    saliencies = {
        "conv": torch.tensor([[1.0, 1.0], [0.1, 0.1], [5.0, 0.0]]),  # channel sums 2, 0.2, 5
        "fc": torch.tensor([[0.3], [9.0]]),  # channel sums 0.3, 9
    }
    masks = global_prune_masks(saliencies, 0.4, structured=True)  # 5 channels -> prune 2
    assert torch.equal(masks["conv"], torch.tensor([[True, True], [False, False], [True, True]]))
    assert torch.equal(masks["fc"], torch.tensor([[False], [True]]))


def test_obd_masks_from_exact_hessian_follow_the_saliency_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    params = select_parameters(model)
    assert list(params) == ["0.weight", "2.weight"]
    hess = exact_hessian_diagonal(lambda: F.cross_entropy(model(x), y), params)
    sal = {n: obd_saliency(params[n], hess[n]) for n in params}
    masks = global_prune_masks(sal, 0.25)
    pruned = torch.cat([sal[n][~masks[n]] for n in sal])
    kept = torch.cat([sal[n][masks[n]] for n in sal])
    assert pruned.numel() == round(0.25 * 42)
    assert pruned.max() <= kept.min()


def test_masks_apply_zero_weights_and_block_their_gradient():
    torch.manual_seed(0)
    net = Net()
    params = select_parameters(net)
    assert list(params) == ["conv.weight", "body.1.weight", "head.weight"]
    masks = global_prune_masks({n: magnitude_saliency(p) for n, p in params.items()}, 0.6)
    apply_masks(net, masks)
    for name, mask in masks.items():
        module_path, _, _ = name.rpartition(".")
        weight = net.get_submodule(module_path).weight
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum())))
    expected = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert sparsity_of(net) == pytest.approx(expected)
    assert sparsity_of(net) == pytest.approx(0.6, abs=1e-2)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert (net.head.weight_orig.grad[~masks["head.weight"]] == 0).all()
    # The same parameter object is kept, so an existing optimizer still updates it.
    assert select_parameters(net)["head.weight"] is net.head.weight_orig


def test_iterative_pruning_is_cumulative_and_reaches_schedule_targets():
    torch.manual_seed(0)
    net = Net()
    for target in sparsity_schedule(0.8, 3, "geometric"):
        # Masked values: pruned ones are 0, so they are ranked first again.
        weights = effective_parameters(net)
        apply_masks(net, global_prune_masks({n: w.abs() for n, w in weights.items()}, target))
        assert sparsity_of(net) == pytest.approx(target, abs=2e-3)
    per_param = sparsity_by_parameter(net)
    assert set(per_param) == {"conv.weight", "body.1.weight", "head.weight"}


def test_masks_survive_state_dict_round_trip_into_a_fresh_model():
    torch.manual_seed(0)
    net = Net()
    masks = global_prune_masks({n: p.abs() for n, p in select_parameters(net).items()}, 0.5)
    apply_masks(net, masks)
    state = net.state_dict()
    assert "head.weight_mask" in state and "head.weight_orig" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    torch.manual_seed(1)
    fresh = Net()
    load_pruned_state_dict(fresh, torch.load(buffer))
    assert torch.equal(fresh.head.weight_mask, masks["head.weight"].float())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), net(x))
    # Still applied: a training step cannot revive a pruned weight.
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    fresh(x).pow(2).sum().backward()
    opt.step()
    fresh(x)
    assert (fresh.head.weight[~masks["head.weight"]] == 0).all()
    assert sparsity_of(fresh) == pytest.approx(sparsity_of(net))

    assert sorted(make_pruning_permanent(fresh)) == sorted(masks)
    assert "head.weight" in dict(fresh.named_parameters())
    assert "head.weight_mask" not in fresh.state_dict()
    assert (fresh.head.weight[~masks["head.weight"]] == 0).all()


def test_bad_sparsity_and_selection_raise_clear_errors():
    net = Net()
    for bad in (1.0, -0.1, 1.5, "half"):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
            global_prune_masks({"w": torch.ones(3)}, bad)
    with pytest.raises(ValueError, match="pruning target names no parameter"):
        global_prune_masks({}, 0.5)
    with pytest.raises(
        ValueError, match=r"pruning target names no parameter.*\['nope\.\*'\].*valid names are"
    ):
        select_parameters(net, include=["head.weight", "nope.*"])
    with pytest.raises(ValueError, match="valid names are.*'head.bias'"):
        apply_masks(net, {"head.wieght": torch.ones(3, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="pruning target names no parameter.*no Linear/Conv"):
        select_parameters(nn.Sequential(nn.BatchNorm1d(3)))
    assert list(select_parameters(net, include=["*.bias"])) == [
        "conv.bias",
        "body.1.bias",
        "head.bias",
    ]
    with pytest.raises(ValueError, match="steps"):
        sparsity_schedule(0.5, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        sparsity_schedule(0.5, 2, "exponential")


def test_schedules_match_their_formulas():
    assert sparsity_schedule(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    geo = sparsity_schedule(0.75, 2, "geometric")
    assert geo == pytest.approx([0.5, 0.75])  # each round removes half of what remains
    cubic = sparsity_schedule(0.8, 2, "cubic")
    assert cubic == pytest.approx([0.8 * (1 - 0.5**3), 0.8])
