"""Load a compressed state into a fresh float model: one function for every loader.

A compressed student's ``state_dict`` does not fit the float architecture it was built from:

* **pruned** (:mod:`~kd_lightning.compression.masks`): ``<name>_orig`` + ``<name>_mask`` keys
  instead of ``<name>``. The state describes itself: an all-ones pruning reparametrisation is
  installed on every named tensor, then the saved masks load into it.
* **quantization-aware trained** (:func:`~kd_lightning.compression.prepare_qat`): extra
  fake-quantize tensors (``*.fake_quant_enabled``, ``*.scale``, the observers' ranges). Their
  layout depends on how ``torch.fx`` traced the model, which the state does not say, so the
  model is prepared again the same way, from a record of which module was prepared, on what
  example input and for which quantized engine (:func:`qat_record`). The record is a plain
  dict of str / int / list of int; kd_lightning checkpoints store it in
  ``checkpoint["kd_lightning"]["compression"]`` (:func:`compression_record` reads it).

:func:`prepare_for_state_dict` installs that structure; :func:`load_compressed_state_dict`
also loads the state. Both return the model to use: QAT preparation builds a new module, so
when ``model`` itself was prepared the returned object is a different one.

Pure torch; never imports lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.compression.masks import install_pruning_for_state_dict, refresh_masked
from kd_lightning.compression.quantization import is_qat_prepared, prepare_qat

__all__ = [
    "COMPRESSION_KEY",
    "compression_record",
    "example_input",
    "is_qat_state",
    "load_compressed_state_dict",
    "prepare_for_state_dict",
    "qat_record",
]

COMPRESSION_KEY = "compression"
"""Key, inside a checkpoint's ``"kd_lightning"`` metadata, of the compression record."""

_METADATA_KEY = "kd_lightning"  # kd_lightning.teachers.CHECKPOINT_KEY (a test keeps them equal)
_LEGACY_QAT_KEY = "kd_lightning_qat"  # where checkpoints of earlier versions kept the QAT record
_FAKE_QUANT_SUFFIX = ".fake_quant_enabled"


def qat_record(
    module: str, example: Tensor, backend: str | None = None
) -> dict[str, dict[str, Any]]:
    """The compression record of a model prepared with :func:`prepare_qat`.

    Args:
        module: path of the prepared module inside the model whose state is saved (e.g.
            ``"student"`` in a kd_lightning method; ``""`` for the model itself).
        example: the example input it was traced with (only its shape and dtype are kept).
        backend: the quantized engine; default the current one.
    """
    return {
        "qat": {
            "module": module,
            "backend": backend or torch.backends.quantized.engine,
            "example_shape": [int(n) for n in example.shape],
            "example_dtype": str(example.dtype).removeprefix("torch."),
        }
    }


def compression_record(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The compression record of a kd_lightning checkpoint, or None when it has none.

    Reads ``checkpoint["kd_lightning"]["compression"]``, and the QAT record that earlier
    versions wrote at the top level of the checkpoint.
    """
    metadata = checkpoint.get(_METADATA_KEY)
    record = metadata.get(COMPRESSION_KEY) if isinstance(metadata, Mapping) else None
    if isinstance(record, Mapping) and record:
        return dict(record)
    legacy = checkpoint.get(_LEGACY_QAT_KEY)
    if isinstance(legacy, Mapping) and legacy.get("example_shape"):
        return {
            "qat": {
                "module": "student",
                "backend": legacy.get("backend"),
                "example_shape": list(legacy["example_shape"]),
                "example_dtype": "float32",
            }
        }
    return None


def example_input(shape: Sequence[int], dtype: str | None = "float32") -> Tensor:
    """An input of the recorded shape and dtype to trace with (uniform floats, or zeros)."""
    dtype_ = getattr(torch, dtype or "float32", None)
    if not isinstance(dtype_, torch.dtype):
        raise ValueError(f"the compression record names an unknown dtype {dtype!r}.")
    if dtype_.is_floating_point:
        return torch.rand(*shape).to(dtype_)
    return torch.zeros(*shape, dtype=dtype_)


def is_qat_state(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict holds fake-quantize tensors (saved from a QAT-prepared model)."""
    return any(key.endswith(_FAKE_QUANT_SUFFIX) for key in state_dict)


def _relative(path: str, module_path: str) -> str | None:
    """``path`` (in the checkpoint's model) as a path inside the model at ``module_path``."""
    if not module_path:
        return path
    if path == module_path:
        return ""
    if path.startswith(f"{module_path}."):
        return path[len(module_path) + 1 :]
    return None


def _no_record(keys: list[str]) -> ValueError:
    return ValueError(
        f"the state holds fake-quantized (quantization-aware training) tensors, e.g. "
        f"{keys[0]!r}, but no record of how the model was prepared for them. Pass "
        "compression=compression_record(checkpoint) for a kd_lightning checkpoint, or "
        "compression={'qat': {'module': '', 'example_shape': [...]}} naming the prepared "
        "module and the input shape it was traced with; or prepare the model with "
        "kd_lightning.compression.prepare_qat(model, example_input) before loading."
    )


def _prepare_qat_module(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    compression: Mapping[str, Any] | None,
    module_path: str,
) -> nn.Module:
    keys = [k for k in state_dict if k.endswith(_FAKE_QUANT_SUFFIX)]
    if not keys:
        return model
    qat = (compression or {}).get("qat")
    if not isinstance(qat, Mapping):
        if is_qat_prepared(model):
            return model
        raise _no_record(keys)
    relative = _relative(str(qat.get("module", "")), module_path)
    outside = [k for k in keys if relative and not k.startswith(f"{relative}.")]
    if relative is None or outside:
        raise ValueError(
            f"the compression record says {qat.get('module')!r} was prepared for "
            f"quantization-aware training, but the state's fake-quantize tensors (e.g. "
            f"{(outside or keys)[0]!r}) lie outside it (the model loaded is at "
            f"{module_path or 'the root'!r}); pass the record of this checkpoint."
        )
    target = model.get_submodule(relative) if relative else model
    if is_qat_prepared(target):
        return model
    if not qat.get("example_shape"):
        raise _no_record(keys)
    example = example_input(qat["example_shape"], qat.get("example_dtype"))
    reference = next(target.parameters(), None)
    prepared = prepare_qat(target, example, backend=qat.get("backend"))
    if reference is not None:
        prepared = prepared.to(reference.device)
    prepared.train(target.training)
    if not relative:
        return prepared
    parent_path, _, name = relative.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, prepared)
    return model


def _prepare(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    compression: Mapping[str, Any] | None,
    module_path: str,
) -> tuple[nn.Module, list[tuple[nn.Module, str]]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module to load the state into, got {type(model)}.")
    model = _prepare_qat_module(model, state_dict, compression, module_path)
    return model, install_pruning_for_state_dict(model, state_dict)


def prepare_for_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    compression: Mapping[str, Any] | None = None,
    *,
    module_path: str = "",
) -> nn.Module:
    """Give ``model`` the structure ``state_dict`` was saved with: QAT, then pruning.

    Call it before ``load_state_dict``. A float model loading a quantization-aware trained
    state gets its recorded module replaced by the fake-quantized one (observers frozen in
    eval mode, like every :func:`prepare_qat` output); a model loading a pruned state gets
    all-ones masks on the pruned tensors. Parts already in that form are left alone, so it is
    safe to call on a model that is already prepared (e.g. while resuming a run).

    Args:
        model: the model whose keys the state dict holds (modified in place where possible).
        state_dict: the state to be loaded.
        compression: the checkpoint's compression record (:func:`compression_record`); needed
            only for a QAT state.
        module_path: where ``model`` sits in the model whose checkpoint the record describes,
            e.g. ``"student"`` when a student is loaded on its own from a method's checkpoint
            (its ``student.`` prefix stripped from the keys); ``""`` when it is that model.

    Returns:
        The model to load into: ``model`` itself, or its fake-quantized replacement when
        ``model`` is the prepared module.

    Raises:
        ValueError: the state is fake-quantized but the record is missing or names another
            module; the message says what to pass.
    """
    return _prepare(model, state_dict, compression, module_path)[0]


def load_compressed_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    compression: Mapping[str, Any] | None = None,
    *,
    module_path: str = "",
    strict: bool = True,
) -> nn.Module:
    """:func:`prepare_for_state_dict`, ``load_state_dict``, and the masked tensors recomputed.

    Works for plain, pruned and quantization-aware trained states alike. Returns the loaded
    model (see :func:`prepare_for_state_dict` for when it is a new object).
    """
    model, pruned = _prepare(model, state_dict, compression, module_path)
    model.load_state_dict(state_dict, strict=strict)
    for sub, tensor_name in pruned:
        refresh_masked(sub, tensor_name)
    return model
