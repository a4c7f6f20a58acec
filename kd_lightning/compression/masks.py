"""Pruning masks that keep the parameter order, and re-installing them before a state loads.

:mod:`torch.nn.utils.prune` deletes ``<name>`` and appends ``<name>_orig``, so a pruned
``Linear`` lists ``bias`` before ``weight_orig``: an optimizer built on a model pruned *after*
its state was saved would see its parameters in another order, and a resumed optimizer state
would not line up. :func:`install_masks` prunes and puts ``<name>_orig`` back where ``<name>``
was. :func:`install_pruning_for_state_dict` gives a fresh (unpruned) module the same
reparametrisation a pruned state dict was saved with (``<name>_orig`` + ``<name>_mask`` keys),
so the state loads without the pruning callback; :func:`register_pruning_reload_hooks` does it
automatically from ``load_state_dict`` hooks.

Pure torch; never imports lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = [
    "current_masks",
    "install_masks",
    "install_pruning_for_state_dict",
    "is_pruned",
    "is_pruned_state",
    "refresh_masked",
    "register_pruning_reload_hooks",
    "restore_masks",
]

_RELOAD_HOOKS_FLAG = "_kd_pruning_reload_hooks"


def _reorder_like(sub: nn.Module, order: Sequence[str]) -> None:
    """Put ``<name>_orig`` where ``<name>`` was in ``sub._parameters``."""
    params = sub._parameters
    ordered: dict[str, Any] = {}
    for name in order:
        for candidate in (name, f"{name}_orig"):
            if candidate in params and candidate not in ordered:
                ordered[candidate] = params[candidate]
    for name, value in params.items():
        ordered.setdefault(name, value)
    params.clear()
    params.update(ordered)


def _submodule(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, tensor_name = name.rpartition(".")
    return (module.get_submodule(path) if path else module), tensor_name


def is_pruned(sub: nn.Module, tensor_name: str) -> bool:
    """Whether ``sub.<tensor_name>`` carries a pruning reparametrisation (``_orig`` + ``_mask``)."""
    return hasattr(sub, f"{tensor_name}_mask") and hasattr(sub, f"{tensor_name}_orig")


def is_pruned_state(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict was saved from a pruned model (a ``<name>_mask`` / ``_orig`` pair)."""
    return any(
        k.endswith("_mask") and f"{k[: -len('_mask')]}_orig" in state_dict for k in state_dict
    )


def refresh_masked(sub: nn.Module, tensor_name: str) -> None:
    """Recompute ``sub.<tensor_name> = _orig * _mask`` now, not at the next forward.

    The pruning forward pre-hook recomputes the masked tensor; after a state dict was loaded
    or a mask changed, the attribute is stale until then.
    """
    for hook in sub._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == tensor_name:
            hook(sub, None)


def install_masks(module: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply boolean masks (``{parameter name: mask}``) in place, keeping the parameter order.

    Like :func:`kd_lightning.compression.apply_masks` (a tensor pruned before keeps its pruned
    entries: the masks multiply), but every pruned layer lists ``<name>_orig`` where
    ``<name>`` was, so ``module.parameters()`` has the same order before and after pruning.
    """
    for name, mask in masks.items():
        sub, tensor_name = _submodule(module, name)
        order = list(sub._parameters)
        if is_pruned(sub, tensor_name):
            current = getattr(sub, f"{tensor_name}_mask")
            if mask.shape != current.shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(current.shape)}."
                )
        elif tensor_name not in sub._parameters:
            raise ValueError(
                f"pruning target names no parameter: {name!r} is not a parameter of the module."
            )
        prune.custom_from_mask(sub, tensor_name, mask.to(getattr(sub, tensor_name).device))
        _reorder_like(sub, order)


def current_masks(module: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """``{name: bool mask}`` of the named tensors on the CPU; all ones where not pruned."""
    masks = {}
    for name in names:
        sub, tensor_name = _submodule(module, name)
        mask = getattr(sub, f"{tensor_name}_mask", None)
        if mask is None:
            base = getattr(sub, f"{tensor_name}_orig", None)
            base = getattr(sub, tensor_name) if base is None else base
            masks[name] = torch.ones(base.shape, dtype=torch.bool)
        else:
            masks[name] = mask.detach().bool().cpu()
    return masks


def restore_masks(module: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Overwrite the masks of already pruned tensors (e.g. undo a pruning round)."""
    for name, mask in masks.items():
        sub, tensor_name = _submodule(module, name)
        buffer = getattr(sub, f"{tensor_name}_mask", None)
        if buffer is None:
            raise ValueError(f"{name!r} is not pruned: there is no mask to restore.")
        buffer.copy_(mask.to(buffer.device, buffer.dtype))
        refresh_masked(sub, tensor_name)


def install_pruning_for_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> list[tuple[nn.Module, str]]:
    """Install an all-ones pruning mask for every ``<name>_mask`` / ``<name>_orig`` key pair.

    Call it on a fresh (unpruned) module before ``load_state_dict`` of a pruned state: the keys
    then match and the loaded masks take effect. Layers already pruned are left alone; the
    parameter order is kept. Keys that name no submodule or parameter of ``module`` are left
    for ``load_state_dict`` to report.

    Args:
        module: the module that will load ``state_dict``.
        state_dict: the state to be loaded.
        prefix: prefix of ``module``'s own keys in ``state_dict``.

    Returns:
        ``(submodule, tensor name)`` of every pruned tensor the state dict names; pass each
        to :func:`refresh_masked` after loading.
    """
    targets = []
    for key in state_dict:
        if not key.startswith(prefix) or not key.endswith("_mask"):
            continue
        base = key[len(prefix) : -len("_mask")]
        if f"{prefix}{base}_orig" not in state_dict:
            continue
        try:
            sub, tensor_name = _submodule(module, base)
        except AttributeError:
            continue
        if not is_pruned(sub, tensor_name):
            if tensor_name not in sub._parameters:
                continue
            order = list(sub._parameters)
            prune.identity(sub, tensor_name)
            _reorder_like(sub, order)
        targets.append((sub, tensor_name))
    return targets


def _reload_pre_hook(module: nn.Module, state_dict, prefix, *args) -> None:
    module.__dict__["_kd_pruning_pending"] = install_pruning_for_state_dict(
        module, state_dict, prefix
    )


def _reload_post_hook(module: nn.Module, incompatible_keys) -> None:
    for sub, tensor_name in module.__dict__.pop("_kd_pruning_pending", []):
        refresh_masked(sub, tensor_name)


def register_pruning_reload_hooks(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` install the pruning a state needs before loading it.

    Idempotent. Lightning restores a resumed model's weights before any callback's
    ``on_load_checkpoint`` runs, so a pruning callback registers these in ``setup``.
    """
    if module.__dict__.get(_RELOAD_HOOKS_FLAG, False):
        return
    module.register_load_state_dict_pre_hook(_reload_pre_hook)
    module.register_load_state_dict_post_hook(_reload_post_hook)
    module.__dict__[_RELOAD_HOOKS_FLAG] = True
