r"""Saliency-based pruning: Optimal Brain Damage and magnitude pruning, global masks, schedules.

Saliency of a weight :math:`w_k` (LeCun, Denker & Solla 1990, "Optimal Brain Damage"): at a
minimum of the loss, with the Hessian taken as diagonal, deleting :math:`w_k` raises the loss
by

.. math:: s_k = \tfrac12 \, h_{kk} \, w_k^2 .

The magnitude baseline is :math:`s_k = |w_k|` (Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks"). :func:`global_prune_masks` removes the
lowest-saliency fraction over all selected tensors together, so layers compete for the
budget.

Masks are applied with :mod:`torch.nn.utils.prune` (``custom_from_mask``): the original tensor
becomes the parameter ``<name>_orig``, the mask the buffer ``<name>_mask``, and a forward
pre-hook recomputes ``<name> = <name>_orig * <name>_mask``. Both land in ``state_dict``, hence
in every checkpoint; :func:`load_pruned_state_dict` re-installs the reparametrisation on a
fresh model before loading. The parameter object is kept, so an optimizer built before
pruning keeps updating it, and the masked entries get zero gradient.

Pure torch; never imports lightning.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from kd_lightning.compression.masks import install_pruning_for_state_dict, refresh_masked

__all__ = [
    "apply_masks",
    "channel_saliency",
    "copy_with_masks_applied",
    "effective_parameters",
    "global_prune_masks",
    "load_pruned_state_dict",
    "magnitude_saliency",
    "make_pruning_permanent",
    "obd_saliency",
    "select_parameters",
    "sparsity_by_parameter",
    "sparsity_of",
    "sparsity_schedule",
]

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)
"""Layer types whose ``weight`` is prunable by default."""


def obd_saliency(weight: Tensor, hessian_diag: Tensor) -> Tensor:
    r"""OBD saliency :math:`s_k = \frac12 h_{kk} w_k^2` (LeCun et al. 1990).

    Args:
        weight: parameter values (already masked values stay 0, so their saliency is 0).
        hessian_diag: diagonal of the loss Hessian, same shape as ``weight``.

    Returns:
        Saliency, same shape as ``weight``.
    """
    if weight.shape != hessian_diag.shape:
        raise ValueError(
            f"hessian_diag shape {tuple(hessian_diag.shape)} differs from weight shape "
            f"{tuple(weight.shape)}; pass the Hessian diagonal of this very tensor."
        )
    return 0.5 * hessian_diag.detach() * weight.detach() ** 2


def magnitude_saliency(weight: Tensor) -> Tensor:
    """Magnitude saliency :math:`|w_k|` (Han et al. 2015)."""
    return weight.detach().abs()


def channel_saliency(saliency: Tensor, dim: int = 0) -> Tensor:
    """Structured saliency: sum of the element saliencies of each output channel.

    Args:
        saliency: element saliencies of a weight, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
        dim: channel dimension (0 = output channels / rows of a Linear weight).

    Returns:
        One value per channel, shape ``(saliency.shape[dim],)``.
    """
    moved = saliency.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).sum(1)


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, int | float) or not (0.0 <= sparsity < 1.0):
        raise ValueError(
            f"sparsity must be a fraction in [0, 1) (0.5 prunes half of the weights), got "
            f"{sparsity!r}; pruning every weight (1.0) would leave no network."
        )


def global_prune_masks(
    saliencies: Mapping[str, Tensor],
    sparsity: float,
    *,
    structured: bool = False,
    dim: int = 0,
) -> dict[str, Tensor]:
    """Masks that remove the lowest-saliency fraction of entries across all given tensors.

    Exactly ``round(sparsity * total)`` entries are pruned (``total`` = number of elements, or
    of channels when ``structured``). Ties are broken by position (first tensor, first index
    first) so the result is deterministic.

    Args:
        saliencies: ``{parameter name: saliency}``, e.g. from :func:`obd_saliency`.
        sparsity: fraction to prune, in ``[0, 1)``. Cumulative: entries already zero have
            saliency 0 and are chosen first, so iterative pruning reaches this total.
        structured: rank whole channels by :func:`channel_saliency` and prune channels.
            Channels of layers with a larger fan-in sum more terms; normalise the saliencies
            first if the layers differ much.
        dim: channel dimension for ``structured``.

    Returns:
        ``{name: bool mask}`` shaped like each saliency; ``True`` keeps the entry.
    """
    _check_sparsity(sparsity)
    if not saliencies:
        raise ValueError(
            "pruning target names no parameter: saliencies is empty. Select parameters with "
            "select_parameters(module, include=[...]) first."
        )
    names = list(saliencies)
    scores = [
        channel_saliency(saliencies[n], dim) if structured else saliencies[n].reshape(-1)
        for n in names
    ]
    flat = torch.cat([s.detach().float().reshape(-1).cpu() for s in scores])
    if torch.isnan(flat).any():
        raise ValueError("saliencies contain NaN; check the Hessian estimate and the weights.")
    num_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if num_prune > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:num_prune]] = False
    masks: dict[str, Tensor] = {}
    for name, score, chunk in zip(
        names, scores, keep.split([s.numel() for s in scores]), strict=True
    ):
        device = saliencies[name].device
        if structured:
            shape = [1] * saliencies[name].ndim
            shape[dim] = score.numel()
            mask = chunk.reshape(shape).expand_as(saliencies[name]).clone()
        else:
            mask = chunk.reshape(saliencies[name].shape)
        masks[name] = mask.to(device)
    return masks


def _split(name: str) -> tuple[str, str]:
    module_path, _, tensor_name = name.rpartition(".")
    return module_path, tensor_name


def _logical_parameters(module: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` with a pruned ``x.weight_orig`` listed under ``x.weight``."""
    out: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        path, tensor_name = _split(name)
        if tensor_name.endswith("_orig"):
            sub = module.get_submodule(path) if path else module
            base = tensor_name[: -len("_orig")]
            if hasattr(sub, f"{base}_mask"):
                name = f"{path}.{base}" if path else base
        out[name] = param
    return out


def select_parameters(
    module: nn.Module, include: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Resolve which parameters are prunable.

    Args:
        module: the network.
        include: glob patterns (``fnmatch``) over parameter names, e.g.
            ``["fc1.weight", "features.*.weight"]``. ``None`` selects the ``weight`` of every
            Linear / Conv1d / Conv2d / Conv3d layer.

    Returns:
        ``{name: parameter}`` in module order. Names are the logical ones (``fc1.weight``)
        even when pruning is already applied, in which case the value is the underlying
        ``fc1.weight_orig`` parameter.

    Raises:
        ValueError: a pattern matches no parameter, or nothing is selected; the message lists
            the valid names.
    """
    params = _logical_parameters(module)
    if include is None:
        selected = {}
        for name, param in params.items():
            path, tensor_name = _split(name)
            sub = module.get_submodule(path) if path else module
            if tensor_name == "weight" and isinstance(sub, PRUNABLE_LAYERS):
                selected[name] = param
    else:
        if isinstance(include, str):
            include = [include]
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in params)]
        if unmatched:
            raise ValueError(
                f"pruning target names no parameter: pattern(s) {unmatched} match nothing; "
                f"valid names are {sorted(params)}."
            )
        selected = {
            n: p for n, p in params.items() if any(fnmatch.fnmatchcase(n, pat) for pat in include)
        }
    if not selected:
        raise ValueError(
            "pruning target names no parameter: the module has no Linear/Conv weight; pass "
            f"include=[...] patterns; valid names are {sorted(params)}."
        )
    return selected


def apply_masks(module: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply boolean masks in place with ``torch.nn.utils.prune.custom_from_mask``.

    Re-applying to an already pruned tensor multiplies the masks (a pruned entry stays
    pruned). After this, ``module.state_dict()`` holds ``<name>_orig`` and ``<name>_mask``.

    Args:
        module: the network (modified in place).
        masks: ``{parameter name: bool mask}``, e.g. from :func:`global_prune_masks`.
    """
    params = _logical_parameters(module)
    missing = [n for n in masks if n not in params]
    if missing:
        raise ValueError(
            f"pruning target names no parameter: {missing} not found; valid names are "
            f"{sorted(params)}."
        )
    for name, mask in masks.items():
        path, tensor_name = _split(name)
        sub = module.get_submodule(path) if path else module
        if mask.shape != params[name].shape:
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(params[name].shape)}."
            )
        prune.custom_from_mask(sub, tensor_name, mask.to(params[name].device))


def load_pruned_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Load a state dict saved from a pruned model into a fresh (unpruned) one.

    For every ``<name>_mask`` key the pruning reparametrisation is installed first (with an
    all-ones mask), so that ``<name>_orig`` / ``<name>_mask`` keys match; then the state is
    loaded and the masked tensors recomputed. Works on an already pruned module too.

    Args:
        module: the model to load into (modified in place).
        state_dict: e.g. ``torch.load(path)`` of ``pruned.state_dict()``.
        strict: passed to ``load_state_dict``.
    """
    targets = install_pruning_for_state_dict(module, state_dict)
    module.load_state_dict(state_dict, strict=strict)
    for sub, tensor_name in targets:
        refresh_masked(sub, tensor_name)


def make_pruning_permanent(module: nn.Module) -> list[str]:
    """Bake masks into the weights (``prune.remove``): plain parameters, zeros kept.

    Use before quantization or export. Returns the names that were made permanent.
    """
    done = []
    for path, sub in module.named_modules():
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(sub, hook._tensor_name)
                done.append(f"{path}.{hook._tensor_name}" if path else hook._tensor_name)
    return done


def copy_with_masks_applied(module: nn.Module) -> nn.Module:
    """Deep copy with the pruning masks baked into plain parameters; the original is kept.

    For quantization and export, which do not understand the pruning hooks. (A pruned
    tensor computed with autograd is a non-leaf tensor, which ``copy.deepcopy`` refuses:
    it is replaced by its detached value first; the hook recomputes it at the next forward.)
    """
    for sub in module.modules():
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(sub, hook._tensor_name, getattr(sub, hook._tensor_name).detach())
    clone = copy.deepcopy(module)
    make_pruning_permanent(clone)
    return clone


def _effective(module: nn.Module, name: str) -> Tensor:
    path, tensor_name = _split(name)
    sub = module.get_submodule(path) if path else module
    if hasattr(sub, f"{tensor_name}_mask"):
        return getattr(sub, f"{tensor_name}_orig") * getattr(sub, f"{tensor_name}_mask")
    return getattr(sub, tensor_name)


def effective_parameters(
    module: nn.Module, include: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Selected tensors as the forward pass sees them (``orig * mask`` where pruned), detached.

    These are the values to score with :func:`obd_saliency` or :func:`magnitude_saliency`:
    already pruned entries are 0, so they rank lowest and stay pruned in the next round.
    """
    return {name: _effective(module, name).detach() for name in select_parameters(module, include)}


def sparsity_by_parameter(
    module: nn.Module, include: Sequence[str] | None = None
) -> dict[str, float]:
    """Fraction of exactly-zero entries of each selected (masked) tensor."""
    return {
        name: (_effective(module, name) == 0).float().mean().item()
        for name in select_parameters(module, include)
    }


def sparsity_of(module: nn.Module, include: Sequence[str] | None = None) -> float:
    """Fraction of exactly-zero entries over all selected tensors together (masked values).

    Args:
        module: the network.
        include: parameter patterns as in :func:`select_parameters` (default: Linear/Conv
            weights).
    """
    zeros, total = 0, 0
    for name in select_parameters(module, include):
        value = _effective(module, name)
        zeros += int((value == 0).sum())
        total += value.numel()
    return zeros / total


def sparsity_schedule(
    target: float,
    steps: int,
    kind: Literal["linear", "geometric", "cubic"] = "geometric",
) -> list[float]:
    r"""Cumulative sparsity after each of ``steps`` pruning rounds, ending at ``target``.

    * ``linear``: :math:`s_k = s \, k / n`.
    * ``geometric``: every round removes the same fraction of the remaining weights,
      :math:`s_k = 1 - (1 - s)^{k/n}` (iterative pruning as in Han et al. 2015).
    * ``cubic``: :math:`s_k = s \, (1 - (1 - k/n)^3)`, fast early and gentle late (Zhu & Gupta
      2017, "To prune, or not to prune").

    Args:
        target: final sparsity in ``[0, 1)``.
        steps: number of rounds, >= 1.
        kind: ``"linear"``, ``"geometric"`` or ``"cubic"``.

    Returns:
        ``steps`` non-decreasing values, the last equal to ``target``.
    """
    _check_sparsity(target)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    fractions = [k / steps for k in range(1, steps + 1)]
    if kind == "linear":
        values = [target * f for f in fractions]
    elif kind == "geometric":
        values = [1.0 - math.pow(1.0 - target, f) for f in fractions]
    elif kind == "cubic":
        values = [target * (1.0 - (1.0 - f) ** 3) for f in fractions]
    else:
        raise ValueError(f"kind must be one of 'linear', 'geometric', 'cubic'; got {kind!r}.")
    values[-1] = float(target)
    return values
