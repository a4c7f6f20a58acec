r"""Diagonal of the Hessian of a scalar loss with respect to parameters.

Three ways to get :math:`\operatorname{diag}(H)`, :math:`H_{kl} = \partial^2 E / \partial w_k
\partial w_l`, for second-order pruning (LeCun, Denker & Solla 1990, "Optimal Brain Damage"):

* :func:`exact_hessian_diagonal`: exact, by double backpropagation. For every parameter tensor
  the Hessian-vector products with the one-hot vectors of its elements are computed in batches
  (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward pass);
  entry ``k`` of product ``k`` is :math:`H_{kk}`. Cost: one batched backward per
  ``chunk_size`` elements. Affordable for small and medium networks.
* :func:`hutchinson_hessian_diagonal`: unbiased stochastic estimate
  :math:`\operatorname{diag}(H) = \mathbb{E}_z[z \odot Hz]` with Rademacher probes
  :math:`z_i \in \{-1, +1\}` (Bekas, Kokiopoulou & Saad 2007; Hutchinson 1990). Since
  :math:`\mathbb{E}[z_i z_j] = \delta_{ij}`, :math:`\mathbb{E}[z_i (Hz)_i] = H_{ii}`, and the
  variance of one probe is :math:`\operatorname{Var}[z_i (Hz)_i] = \sum_{j \neq i} H_{ij}^2`.
* :func:`obd_hessian_diagonal`: the approximation of the OBD paper, a backward recursion of
  second derivatives through ``Linear`` / ``Conv2d`` layers and element-wise activations that
  drops every off-diagonal term. It costs about one backward pass, exact in special cases only
  (a single layer; one hidden layer with a single output and ``gauss_newton=False``).

Everything here is pure torch and never imports lightning.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ParamsLike = Sequence[Tensor] | Mapping[str, Tensor]
"""Parameters as a sequence of tensors or a ``{name: tensor}`` mapping (e.g. ``named_parameters``)."""

__all__ = [
    "exact_hessian_diagonal",
    "hutchinson_hessian_diagonal",
    "obd_hessian_diagonal",
    "sequential_view",
]


def _unpack(params: ParamsLike) -> tuple[list[str] | None, list[Tensor]]:
    if isinstance(params, Mapping):
        names = list(params.keys())
        tensors = list(params.values())
    else:
        names, tensors = None, list(params)
    if not tensors:
        raise ValueError("params is empty: pass at least one tensor that requires grad.")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.requires_grad:
            label = names[i] if names is not None else f"params[{i}]"
            raise ValueError(
                f"{label} does not require grad; the Hessian is taken with respect to tensors "
                "with requires_grad=True (a frozen parameter cannot be differentiated)."
            )
    return names, tensors


def _pack(names: list[str] | None, tensors: list[Tensor]) -> list[Tensor] | dict[str, Tensor]:
    if names is None:
        return tensors
    return dict(zip(names, tensors, strict=True))


def _gradients_with_graph(
    loss_fn: Callable[[], Tensor], tensors: list[Tensor]
) -> list[Tensor | None]:
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return a scalar tensor (one element); reduce the loss with "
                "mean() or sum() first."
            )
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (unused, or loss linear in them) has a
    # zero second derivative: mark it None so callers write zeros without a second backward.
    return [g if g is not None and g.requires_grad else None for g in grads]


def exact_hessian_diagonal(
    loss_fn: Callable[[], Tensor],
    params: ParamsLike,
    *,
    chunk_size: int = 256,
    vectorize: bool = True,
) -> list[Tensor] | dict[str, Tensor]:
    r"""Exact diagonal of the Hessian by double backpropagation.

    For each tensor :math:`w` and each of its elements :math:`k`, :math:`H_{kk}` is entry
    :math:`k` of :math:`\nabla_w (\nabla_w E \cdot e_k)`. Only the diagonal block of each tensor
    is differentiated (cross-tensor blocks are never formed).

    Args:
        loss_fn: closure taking no arguments and returning the scalar loss (recomputed once).
            It must be deterministic: put dropout in eval mode.
        params: tensors with ``requires_grad=True``, a sequence or a ``{name: tensor}`` mapping.
        chunk_size: one-hot vectors per batched backward; memory is ``chunk_size * numel``
            per tensor.
        vectorize: batch the products with ``is_grads_batched`` (vmap). ``False`` runs one
            backward per element: slower, for operators without a batching rule.

    Returns:
        The diagonal, shaped like each parameter: a list, or a dict with the same keys.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    names, tensors = _unpack(params)
    grads = _gradients_with_graph(loss_fn, tensors)
    diagonals: list[Tensor] = []
    for p, g in zip(tensors, grads, strict=True):
        n = p.numel()
        diag = torch.zeros(n, dtype=p.dtype, device=p.device)
        if g is not None:
            g_flat = g.reshape(-1)
            if vectorize:
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    rows = torch.arange(start, stop, device=p.device)
                    one_hot = torch.zeros(stop - start, n, dtype=g.dtype, device=g.device)
                    one_hot[rows - start, rows] = 1.0
                    (block,) = torch.autograd.grad(
                        g_flat,
                        p,
                        grad_outputs=one_hot,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                    if block is not None:
                        diag[start:stop] = block.reshape(stop - start, n)[rows - start, rows]
            else:
                for k in range(n):
                    (row,) = torch.autograd.grad(g_flat[k], p, retain_graph=True, allow_unused=True)
                    if row is not None:
                        diag[k] = row.reshape(-1)[k]
        diagonals.append(diag.reshape(p.shape).detach())
    return _pack(names, diagonals)


def hutchinson_hessian_diagonal(
    loss_fn: Callable[[], Tensor],
    params: ParamsLike,
    num_samples: int = 100,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    return_variance: bool = False,
) -> (
    list[Tensor]
    | dict[str, Tensor]
    | tuple[list[Tensor] | dict[str, Tensor], list[Tensor] | dict[str, Tensor]]
):
    r"""Unbiased estimate of the Hessian diagonal, :math:`\frac1S \sum_s z_s \odot H z_s`.

    Probes are Rademacher vectors over all tensors jointly, so :math:`Hz` includes the
    cross-tensor blocks of :math:`H` and the estimate is unbiased for the full Hessian.
    Products are computed ``chunk_size`` probes at a time by a batched double backward.

    Args:
        loss_fn: closure returning the scalar loss (evaluated once; deterministic).
        params: tensors with ``requires_grad=True``, a sequence or ``{name: tensor}`` mapping.
        num_samples: number of probes S.
        generator: random generator for the probes (reproducibility). Probes are drawn on
            the generator's device and moved to each parameter's device.
        chunk_size: probes per batched backward.
        return_variance: also return the per-element sample variance of the single-probe
            estimates :math:`z_i (Hz)_i` (unbiased, ``S - 1`` denominator); the standard
            error of the mean is ``sqrt(variance / num_samples)``.

    Returns:
        The mean estimate shaped like the parameters (list or dict like ``params``), or
        ``(mean, variance)`` with ``return_variance=True``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if return_variance and num_samples < 2:
        raise ValueError("return_variance needs num_samples >= 2 to estimate a variance.")
    names, tensors = _unpack(params)
    grads = _gradients_with_graph(loss_fn, tensors)
    live = [i for i, g in enumerate(grads) if g is not None]
    # Chan et al. parallel update of mean and sum of squared deviations, in float64.
    mean = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    m2 = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    count = 0
    gen_device = generator.device if generator is not None else None
    while count < num_samples:
        c = min(chunk_size, num_samples - count)
        probes = []
        for p in tensors:
            bits = torch.randint(
                0, 2, (c, *p.shape), generator=generator, device=gen_device or p.device
            )
            probes.append((bits * 2 - 1).to(device=p.device, dtype=p.dtype))
        if live:
            hz = torch.autograd.grad(
                [grads[i] for i in live],
                [tensors[i] for i in live],
                grad_outputs=[probes[i] for i in live],
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            hz_by_index = dict(zip(live, hz, strict=True))
        else:
            hz_by_index = {}
        for i, p in enumerate(tensors):
            block = hz_by_index.get(i)
            if block is None:
                est = torch.zeros((c, *p.shape), dtype=torch.float64, device=p.device)
            else:
                est = (probes[i] * block).to(torch.float64)
            chunk_mean = est.mean(0)
            chunk_m2 = ((est - chunk_mean) ** 2).sum(0)
            total = count + c
            delta = chunk_mean - mean[i]
            mean[i] = mean[i] + delta * (c / total)
            m2[i] = m2[i] + chunk_m2 + delta**2 * (count * c / total)
        count += c
    means = [m.to(p.dtype) for m, p in zip(mean, tensors, strict=True)]
    if not return_variance:
        return _pack(names, means)
    variances = [(v / (count - 1)).to(p.dtype) for v, p in zip(m2, tensors, strict=True)]
    return _pack(names, means), _pack(names, variances)


# --------------------------------------------------------------------------------------------
# Optimal Brain Damage: backpropagation of (diagonal) second derivatives.
# --------------------------------------------------------------------------------------------

_ELEMENTWISE = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Hardtanh,
)
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Flatten)
_SUPPORTED = (nn.Linear, nn.Conv2d, *_ELEMENTWISE, *_PASSTHROUGH)


def sequential_view(model: nn.Module) -> nn.Sequential | None:
    """The model as an ``nn.Sequential`` with the same parameter names, or None.

    :func:`obd_hessian_diagonal` walks an ``nn.Sequential``; a zoo ``MLP`` computes
    ``classifier(hidden(x.flatten(1)))``, which is the sequence flatten, hidden, classifier.
    """
    if isinstance(model, nn.Sequential):
        return model
    from kd_lightning.models.mlp import MLP

    if type(model) is MLP:
        layers = [
            ("flatten", nn.Flatten()),
            ("hidden", model.hidden),
            ("classifier", model.classifier),
        ]
        return nn.Sequential(OrderedDict(layers))
    return None


def _flatten_layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        layers: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            layers.extend(_flatten_layers(child, f"{prefix}{name}."))
        return layers
    return [(prefix, model)]


def _check_obd_layers(layers: list[tuple[str, nn.Module]]) -> None:
    supported = ", ".join(t.__name__ for t in _SUPPORTED)
    for prefix, layer in layers:
        where = prefix.rstrip(".") or "<model>"
        if not isinstance(layer, _SUPPORTED):
            raise ValueError(
                f"obd_hessian_diagonal supports nn.Sequential stacks of {supported}; layer "
                f"{where!r} is {type(layer).__name__}. Use exact_hessian_diagonal or "
                "hutchinson_hessian_diagonal for other architectures."
            )
        if isinstance(layer, nn.Dropout) and layer.training and layer.p > 0:
            raise ValueError(
                f"layer {where!r} is a Dropout in training mode, so the loss is random; call "
                "model.eval() before computing the Hessian."
            )
        if isinstance(layer, nn.Conv2d) and (
            layer.padding_mode != "zeros" or isinstance(layer.padding, str)
        ):
            raise ValueError(
                f"Conv2d {where!r} uses padding={layer.padding!r}, "
                f"padding_mode={layer.padding_mode!r}; obd_hessian_diagonal supports explicit "
                "integer zero padding only."
            )


def obd_hessian_diagonal(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    reduction: Literal["mean", "sum"] = "mean",
    gauss_newton: bool = True,
) -> dict[str, Tensor]:
    r"""Diagonal Hessian approximation of LeCun, Denker & Solla (1990), "Optimal Brain Damage".

    With :math:`a_i = \sum_j w_{ij} x_j + b_i` and :math:`x_i = f(a_i)`, the chain rule gives
    :math:`\partial^2 E / \partial w_{ij}^2 = \partial^2 E / \partial a_i^2 \, x_j^2` (exact for
    one sample) and the backward recursion

    .. math::
        \frac{\partial^2 E}{\partial a_i^2} \approx f'(a_i)^2 \sum_l w_{li}^2
            \frac{\partial^2 E}{\partial a_l^2} + f''(a_i) \frac{\partial E}{\partial x_i},

    where the approximation drops every off-diagonal :math:`\partial^2 E / \partial a_l
    \partial a_m`. With ``gauss_newton=True`` (the paper's Levenberg-Marquardt choice) the
    :math:`f''` term is dropped too, which keeps every estimate non-negative. The boundary is
    the exact diagonal at the network output: :math:`p_c (1 - p_c)` for softmax
    cross-entropy, :math:`2` for squared error (each divided by the number of terms of a
    ``"mean"`` reduction). Per-sample diagonals are summed over the batch; a weight shared
    over positions (convolution, or a ``Linear`` applied to extra leading dimensions) sums
    the diagonals of the connections that share it, as in the paper.

    Args:
        model: an ``nn.Sequential`` (nesting allowed) of ``Linear``, ``Conv2d`` (integer zero
            padding), element-wise activations (Tanh, Sigmoid, ReLU, LeakyReLU, ELU, GELU,
            SiLU, Softplus, Hardtanh), ``Flatten``, ``Identity`` and eval-mode ``Dropout``.
        inputs: network input batch.
        target: class indices ``(N,)`` for ``"cross_entropy"``; same shape as the output for
            ``"mse"``.
        loss: ``"cross_entropy"`` (``F.cross_entropy`` on logits) or ``"mse"``
            (``F.mse_loss``), matching torch's definitions and ``reduction``.
        reduction: ``"mean"`` or ``"sum"`` as in torch.
        gauss_newton: drop the :math:`f''` terms (non-negative estimate).

    Returns:
        ``{name: diagonal}`` for every parameter of the Linear/Conv2d layers, keyed like
        ``model.named_parameters()``.
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    layers = _flatten_layers(model)
    _check_obd_layers(layers)

    with torch.enable_grad():
        # Forward pass keeping every layer input; outputs stay in the graph so that the first
        # derivatives dE/dx needed by the f'' term come from one ordinary backward.
        x = inputs.detach()
        layer_inputs: list[Tensor] = []
        layer_outputs: list[Tensor] = []
        for _, layer in layers:
            x_in = x.detach().requires_grad_(True) if not layer_inputs else x
            layer_inputs.append(x_in)
            x = layer(x_in)
            layer_outputs.append(x)
        output = x
        if loss == "cross_entropy":
            if output.ndim != 2:
                raise ValueError(
                    f"cross_entropy needs logits of shape (N, C); the model returns "
                    f"{tuple(output.shape)}."
                )
            value = F.cross_entropy(output, target, reduction=reduction)
        else:
            if target.shape != output.shape:
                raise ValueError(
                    f"mse target shape {tuple(target.shape)} differs from the output shape "
                    f"{tuple(output.shape)}."
                )
            value = F.mse_loss(output, target, reduction=reduction)
        first = (
            None
            if gauss_newton
            else torch.autograd.grad(value, layer_outputs, retain_graph=True, allow_unused=True)
        )

    output = output.detach()
    if loss == "cross_entropy":
        prob = torch.softmax(output.float(), dim=-1).to(output.dtype)
        h = prob * (1.0 - prob)
        scale = output.shape[0] if reduction == "mean" else 1
    else:
        h = torch.full_like(output, 2.0)
        scale = output.numel() if reduction == "mean" else 1
    h = h / scale

    result: dict[str, Tensor] = {}
    for index in range(len(layers) - 1, -1, -1):
        prefix, layer = layers[index]
        x_in = layer_inputs[index].detach()
        # h is d2E/d(layer output)^2 (diagonal); turn it into parameter and input diagonals.
        if isinstance(layer, nn.Linear):
            h2 = h.reshape(-1, layer.out_features)
            x2 = x_in.reshape(-1, layer.in_features) ** 2
            result[f"{prefix}weight"] = h2.T @ x2
            if layer.bias is not None:
                result[f"{prefix}bias"] = h2.sum(0)
            h = (h2 @ layer.weight.detach() ** 2).reshape(x_in.shape)
        elif isinstance(layer, nn.Conv2d):
            conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            result[f"{prefix}weight"] = torch.nn.grad.conv2d_weight(
                x_in**2, layer.weight.shape, h, *conv_args
            )
            if layer.bias is not None:
                result[f"{prefix}bias"] = h.sum((0, 2, 3))
            if index > 0:
                h = torch.nn.grad.conv2d_input(
                    x_in.shape, layer.weight.detach() ** 2, h, *conv_args
                )
        elif isinstance(layer, _ELEMENTWISE):
            with torch.enable_grad():
                a = x_in.detach().requires_grad_(True)
                (f1,) = torch.autograd.grad(layer(a).sum(), a, create_graph=not gauss_newton)
            new_h = f1.detach() ** 2 * h
            if not gauss_newton and f1.requires_grad and first[index] is not None:
                (f2,) = torch.autograd.grad(f1.sum(), a)
                new_h = new_h + f2 * first[index]
            h = new_h
        else:  # Flatten, Identity, eval-mode Dropout: the same units, reshaped.
            h = h.reshape(x_in.shape)
    names = [name for name, _ in model.named_parameters()]
    return {name: result[name].detach() for name in names if name in result}
