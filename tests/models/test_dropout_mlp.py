"""DropoutMLP: the plain ReLU net it reduces to, dropout only in training, max-norm projection."""

import pytest
import torch

from kd_lightning.models import DropoutMLP
from kd_lightning.teachers import FrozenTeacher


def test_without_regularisation_it_is_the_relu_mlp_of_its_equation():
    torch.manual_seed(0)
    net = DropoutMLP(in_features=6, hidden_sizes=[5, 4], num_classes=3).eval()
    x = torch.randn(7, 1, 2, 3)
    (w1, b1), (w2, b2) = ((b[0].weight, b[0].bias) for b in net.hidden)
    h = torch.relu(x.flatten(1) @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    expected = h @ net.classifier.weight.T + net.classifier.bias
    torch.testing.assert_close(net(x), expected)


def test_dropout_acts_only_in_training_mode():
    torch.manual_seed(0)
    net = DropoutMLP(in_features=20, hidden_sizes=[50], input_dropout=0.2, dropout=0.5)
    x = torch.randn(4, 20)
    net.train()
    assert not torch.equal(net(x), net(x))  # fresh masks each call
    net.eval()
    assert torch.equal(net(x), net(x))


def test_max_norm_projects_rows_onto_the_ball_and_keeps_their_direction():
    net = DropoutMLP(in_features=4, hidden_sizes=[3], max_norm=2.0)
    weight = net.hidden[0][0].weight
    with torch.no_grad():
        weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0, 2.0]]))
    before = weight.detach().clone()
    net.train()
    net(torch.zeros(1, 4))
    # row 0: norm 5 -> 2, same direction (0.6, 0.8); row 1: norm 1 and row 2: norm 2 stay.
    torch.testing.assert_close(weight[0], torch.tensor([1.2, 1.6, 0, 0]))
    assert torch.equal(weight[1:], before[1:])
    after = weight.detach().clone()
    net.apply_max_norm()  # idempotent: a projected row is not touched again
    assert torch.equal(weight, after)


def test_max_norm_holds_after_training_steps_and_is_applied_when_evaluating():
    torch.manual_seed(0)
    net = DropoutMLP(in_features=8, hidden_sizes=[16, 16], max_norm=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=5.0)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    net.eval()  # the last step's update is projected when the net leaves training mode
    for block in net.hidden:
        assert float(block[0].weight.detach().norm(dim=1).max()) <= 0.5 * (1 + 1e-5)
    assert float(net.classifier.weight.detach().norm(dim=1).max()) > 0.5  # the output layer is free
    frozen = FrozenTeacher(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    frozen(x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_bad_arguments_name_the_valid_range():
    with pytest.raises(ValueError, match="dropout must be in"):
        DropoutMLP(dropout=1.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        DropoutMLP(max_norm=0.0)
