"""Hessian diagonals checked against independent references.

The reference for "exact" is an element-by-element double backprop (one scalar backward per
parameter element) and the full Hessian from ``torch.func``. Hutchinson's estimator is checked
against the exact diagonal and against its theoretical variance
:math:`\\sum_{j \\neq i} H_{ij}^2`. The OBD recursion is checked in the cases where it is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.compression import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
)


def _loop_reference(loss_fn, tensors):
    """One scalar double backward per parameter element: the textbook definition."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    out = []
    for p, g in zip(tensors, grads, strict=True):
        diag = torch.zeros(p.numel(), dtype=p.dtype)
        for k in range(p.numel()):
            (row,) = torch.autograd.grad(g.reshape(-1)[k], p, retain_graph=True)
            diag[k] = row.reshape(-1)[k]
        out.append(diag.reshape(p.shape))
    return out


def _tiny_mlp(dtype=torch.float64, seed=0):
    """4-3-2 tanh MLP, cross-entropy on a fixed batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    x = torch.randn(16, 4, dtype=dtype)
    y = torch.randint(0, 2, (16,))
    return model, x, y


def _full_hessian(model, x, y):
    """Full Hessian of the cross-entropy over the flattened parameter vector (torch.func)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(vec):
        params = {n: c.reshape(s) for n, c, s in zip(names, vec.split(sizes), shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # jacrev twice (reverse-over-reverse) = the double backprop being tested, independently.
    return torch.func.jacrev(torch.func.jacrev(loss_of))(flat)


def _flat(tensors):
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(-1) for t in values])


@pytest.mark.parametrize("vectorize", [True, False])
def test_exact_diagonal_equals_loop_double_backprop(vectorize):
    model, x, y = _tiny_mlp()
    params = dict(model.named_parameters())

    def loss_fn():
        return F.cross_entropy(model(x), y)

    reference = _loop_reference(loss_fn, list(params.values()))
    exact = exact_hessian_diagonal(loss_fn, params, chunk_size=5, vectorize=vectorize)
    assert list(exact) == list(params)  # same keys, same order
    for ref, got in zip(reference, exact.values(), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    # Curvature is nonzero, so the comparison is not 0 == 0.
    assert _flat(reference).abs().max() > 1e-2


def test_exact_diagonal_equals_full_hessian_diagonal_in_float32():
    model, x, y = _tiny_mlp(torch.float32)
    full = _full_hessian(model, x, y)
    exact = exact_hessian_diagonal(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    assert isinstance(exact, list)
    torch.testing.assert_close(_flat(exact), full.diagonal(), atol=1e-6, rtol=1e-5)


def test_exact_diagonal_is_zero_for_unused_and_linear_parameters():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    linear = torch.ones(2, requires_grad=True)
    diag = exact_hessian_diagonal(lambda: (w**3).sum() + (linear * 5).sum(), [w, unused, linear])
    torch.testing.assert_close(diag[0], 6 * w.detach())  # d2/dw2 w^3 = 6w
    assert torch.equal(diag[1], torch.zeros(3)) and torch.equal(diag[2], torch.zeros(2))


def test_hutchinson_converges_to_exact_diagonal():
    model, x, y = _tiny_mlp()
    exact = _flat(_full_hessian(model, x, y).diagonal())

    def loss_fn():
        return F.cross_entropy(model(x), y)

    def rel_error(num_samples):
        gen = torch.Generator().manual_seed(1)
        est = hutchinson_hessian_diagonal(
            loss_fn, list(model.parameters()), num_samples, generator=gen, chunk_size=500
        )
        return ((_flat(est) - exact).norm() / exact.norm()).item()

    few, many = rel_error(50), rel_error(2000)
    assert many < few
    assert many < 0.1


def test_hutchinson_is_unbiased_and_reports_rademacher_variance():
    model, x, y = _tiny_mlp()
    full = _full_hessian(model, x, y)
    exact = full.diagonal()
    # Var[z_i (Hz)_i] = sum_{j != i} H_ij^2 for Rademacher z (a Gaussian z would add 2 H_ii^2).
    theory_var = (full**2).sum(1) - exact**2
    params = dict(model.named_parameters())

    def loss_fn():
        return F.cross_entropy(model(x), y)

    runs, per_run = 10, 400
    means, variances = [], []
    for seed in range(runs):
        mean, var = hutchinson_hessian_diagonal(
            loss_fn,
            params,
            per_run,
            generator=torch.Generator().manual_seed(seed),
            return_variance=True,
            chunk_size=per_run,
        )
        assert list(mean) == list(params) and list(var) == list(params)
        means.append(_flat(mean))
        variances.append(_flat(var))
    grand_mean = torch.stack(means).mean(0)
    pooled_var = torch.stack(variances).mean(0)
    # Unbiased: the average over 4000 probes sits within 5 standard errors of the diagonal.
    std_error = (theory_var / (runs * per_run)).sqrt()
    assert ((grand_mean - exact).abs() <= 5 * std_error + 1e-12).all()
    # The reported per-probe variance matches the theory.
    torch.testing.assert_close(pooled_var, theory_var, rtol=0.15, atol=1e-6)


def test_obd_is_exact_for_a_single_linear_layer_with_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 4, (12,))
    exact = exact_hessian_diagonal(
        lambda: F.cross_entropy(model(x), y), dict(model.named_parameters())
    )
    for gauss_newton in (True, False):
        obd = obd_hessian_diagonal(model, x, y, gauss_newton=gauss_newton)
        assert list(obd) == ["0.weight", "0.bias"]
        for name in exact:
            torch.testing.assert_close(obd[name], exact[name])


def test_obd_recursion_is_exact_for_one_hidden_layer_and_one_output():
    # One output unit: each hidden unit reaches the loss through one weight, so no
    # off-diagonal term is dropped and the recursion with f'' is exact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, t = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    exact = exact_hessian_diagonal(lambda: F.mse_loss(model(x), t), dict(model.named_parameters()))
    obd = obd_hessian_diagonal(model, x, t, loss="mse", gauss_newton=False)
    assert list(obd) == list(exact)
    for name in exact:
        torch.testing.assert_close(obd[name], exact[name])
    # The Levenberg-Marquardt variant drops f'' (so differs where tanh curves) and is >= 0.
    lm = obd_hessian_diagonal(model, x, t, loss="mse")
    assert not torch.allclose(lm["0.weight"], exact["0.weight"])
    torch.testing.assert_close(lm["2.weight"], exact["2.weight"])  # output layer: exact
    assert all((v >= 0).all() for v in lm.values())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_obd_conv_weight_sharing_is_exact_under_squared_error(reduction):
    # The output Hessian of squared error is diagonal and the output is linear in the kernel,
    # so summing the diagonals of the connections that share a weight is exact here.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), nn.Flatten())
    model = model.double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    t = torch.randn(4, 3 * 4 * 4, dtype=torch.float64)
    exact = exact_hessian_diagonal(
        lambda: F.mse_loss(model(x), t, reduction=reduction), dict(model.named_parameters())
    )
    obd = obd_hessian_diagonal(model, x, t, loss="mse", reduction=reduction)
    for name in exact:
        torch.testing.assert_close(obd[name], exact[name])


def _unrolled_conv(conv: nn.Conv2d, in_shape):
    """Dense matrix of a conv layer and, per entry, the index of the kernel weight it uses."""
    n_in = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
    index_kernel = torch.arange(1, conv.weight.numel() + 1, dtype=torch.float64)
    args = (None, conv.stride, conv.padding, conv.dilation, conv.groups)
    idx = F.conv2d(basis, index_kernel.reshape(conv.weight.shape), *args)
    out_shape = idx.shape[1:]
    idx = idx.reshape(n_in, -1).T.round().long()  # (n_out, n_in); 0 = no connection
    weights = torch.cat([torch.zeros(1, dtype=torch.float64), conv.weight.detach().reshape(-1)])
    dense = weights[idx]
    bias = conv.bias.detach().repeat_interleave(out_shape[1] * out_shape[2])
    return dense, bias, idx, out_shape


def test_obd_conv_backprop_equals_the_unrolled_dense_network():
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(1, 2, 3, stride=1, padding=1), nn.Conv2d(2, 3, 2, stride=2)
    conv_net = nn.Sequential(conv1, nn.Tanh(), conv2, nn.Flatten()).double()
    m1, b1, idx1, shape1 = _unrolled_conv(conv1, (1, 4, 4))
    m2, b2, idx2, _ = _unrolled_conv(conv2, tuple(shape1))
    dense_net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, m1.shape[0]), nn.Tanh(), nn.Linear(m1.shape[0], m2.shape[0])
    ).double()
    with torch.no_grad():
        dense_net[1].weight.copy_(m1), dense_net[1].bias.copy_(b1)
        dense_net[3].weight.copy_(m2), dense_net[3].bias.copy_(b2)
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 12, (6,))
    torch.testing.assert_close(dense_net(x), conv_net(x))

    conv_diag = obd_hessian_diagonal(conv_net, x, y, gauss_newton=False)
    dense_diag = obd_hessian_diagonal(dense_net, x, y, gauss_newton=False)
    for conv_name, dense_name, idx, conv in (("0", "1", idx1, conv1), ("2", "3", idx2, conv2)):
        # A shared kernel weight's diagonal is the sum over the dense entries that use it.
        shared = torch.zeros(conv.weight.numel() + 1, dtype=torch.float64)
        shared.index_add_(0, idx.reshape(-1), dense_diag[f"{dense_name}.weight"].reshape(-1))
        torch.testing.assert_close(conv_diag[f"{conv_name}.weight"].reshape(-1), shared[1:])
        per_channel = dense_diag[f"{dense_name}.bias"].reshape(conv.out_channels, -1).sum(1)
        torch.testing.assert_close(conv_diag[f"{conv_name}.bias"], per_channel)


def test_obd_rejects_unsupported_layers_and_training_dropout():
    with pytest.raises(ValueError, match=r"layer '1' is BatchNorm1d.*exact_hessian_diagonal"):
        obd_hessian_diagonal(
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
            torch.randn(3, 2),
            torch.tensor([0, 1, 0]),
        )
    with pytest.raises(ValueError, match=r"Dropout in training mode.*model.eval\(\)"):
        obd_hessian_diagonal(
            nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)),
            torch.randn(3, 2),
            torch.tensor([0, 1, 0]),
        )


def test_bad_arguments_raise_clear_errors():
    frozen = torch.ones(2)
    with pytest.raises(ValueError, match="requires_grad=True"):
        exact_hessian_diagonal(lambda: frozen.sum(), {"w": frozen})
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        exact_hessian_diagonal(lambda: w * 2, [w])
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_hessian_diagonal(lambda: (w**2).sum(), [w], 0)
