"""Hessian diagonals checked against an element-by-element double-backprop reference."""

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
    """Independent reference: one scalar double backward per parameter element."""
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


def _tiny_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    x = torch.randn(16, 4, dtype=dtype)
    y = torch.randint(0, 2, (16,))
    return model, (lambda: F.cross_entropy(model(x), y)), x, y


def _full_hessian(model, loss_fn):
    """Full Hessian over the flattened parameter vector, via torch.func.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss_of(vec):
        params = {
            n: c.reshape(s) for n, c, s in zip(names, vec.split(sizes), shapes, strict=True)
        }
        return torch.func.functional_call(model, params, ())

    del loss_of  # functional_call needs inputs; see caller-specific closure below
    return names, shapes, sizes, flat


@pytest.mark.parametrize("vectorize", [True, False])
def test_exact_diagonal_equals_loop_double_backprop(vectorize):
    model, loss_fn, _, _ = _tiny_problem()
    params = dict(model.named_parameters())
    reference = _loop_reference(loss_fn, list(params.values()))
    exact = exact_hessian_diagonal(loss_fn, params, chunk_size=5, vectorize=vectorize)
    assert list(exact) == list(params)
    for ref, got in zip(reference, exact.values(), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    # Nonzero curvature somewhere, so the comparison is not trivially 0 == 0.
    assert max(r.abs().max().item() for r in reference) > 1e-3


def test_exact_diagonal_equals_torch_func_hessian_in_float32():
    model, _, x, y = _tiny_problem(torch.float32)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(vec):
        params = {n: c.reshape(s) for n, c, s in zip(names, vec.split(sizes), shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    full = torch.func.hessian(loss_of)(flat)
    exact = exact_hessian_diagonal(lambda: loss_of_model(model, x, y), list(model.parameters()))
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in exact]), full.diagonal(),
                               atol=1e-6, rtol=1e-5)


def loss_of_model(model, x, y):
    return F.cross_entropy(model(x), y)
