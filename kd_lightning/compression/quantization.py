"""Int8 quantization of a trained student: dynamic and static post-training, and QAT.

Built on ``torch.ao.quantization``, which ships with torch and needs no new dependency. It is
marked deprecated (torch 2.13 warns that it moves to the separate ``torchao`` package:
eager ``quantize_dynamic`` -> ``torchao.quantization.quantize_``, FX -> ``torchao`` PT2E), but
works on CPU in torch 2.13. Those deprecation warnings are silenced inside these functions only,
since a user cannot act on them; the migration is a change of this module, not of callers.

* :func:`quantize_dynamic_int8`: weights stored in int8, activations quantized on the fly
  per batch. ``Linear`` (and ``LSTM``/``GRU``) only: no calibration, the usual choice for MLPs
  and transformers.
* :func:`quantize_static_int8`: FX graph mode post-training static quantization with
  calibration batches; quantizes ``Conv`` and ``Linear`` and fuses ``Conv-BN-ReLU``. FX must
  trace the model symbolically; when its forward has Python control flow on the input
  (``torch.fx`` cannot trace that), its children are traced and quantized one by one
  instead, the parent's forward staying float.
* :func:`prepare_qat` / :func:`convert_qat`: quantization-aware training (Jacob et al. 2018,
  "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference"): fake-quantize modules simulate int8 rounding in the forward pass and pass
  gradients straight through, so the student learns weights that survive quantization.
  Their observers move the int8 ranges in training mode only
  (:func:`freeze_observers_in_eval`): evaluating a model changes none of its tensors.

The returned models run on the CPU quantized engine (``torch.backends.quantized.engine``,
``x86`` / ``fbgemm`` on Intel/AMD, ``qnnpack`` on ARM). Every function works on a deep copy:
the trained float model is left as it was. Pruning masks are baked into the copy first.

Pure torch; never imports lightning.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kd_lightning.compression.pruning import copy_with_masks_applied

__all__ = [
    "convert_qat",
    "freeze_observers_in_eval",
    "is_qat_prepared",
    "model_size_bytes",
    "prepare_qat",
    "quantize_dynamic_int8",
    "quantize_static_int8",
]


@contextmanager
def _quiet_torch_ao():
    # torch.ao.quantization warns at every call that it is deprecated in favour of torchao,
    # and observers warn about their own reduce_range argument; neither is actionable here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        yield


def _backend(backend: str | None) -> str:
    engine = backend or torch.backends.quantized.engine
    supported = torch.backends.quantized.supported_engines
    if engine not in supported or engine == "none":
        raise ValueError(
            f"quantization backend {engine!r} is not available here; choose one of "
            f"{[e for e in supported if e != 'none']}."
        )
    torch.backends.quantized.engine = engine
    return engine


def _float_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    return copy_with_masks_applied(model)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the weights on disk.

    Includes the serialisation format's per-tensor overhead (~0.3 KB per tensor in torch's
    zip format), which matters for very small models.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def quantize_dynamic_int8(
    model: nn.Module,
    layer_types: Iterable[type[nn.Module]] = (nn.Linear,),
    *,
    backend: str | None = None,
) -> nn.Module:
    """Post-training dynamic quantization: int8 weights, activations quantized per batch.

    Args:
        model: trained float model (not modified).
        layer_types: module types to quantize; ``Linear``, ``LSTM``, ``GRU`` are supported
            by torch (convolutions are not: use :func:`quantize_static_int8`).
        backend: quantized engine, default the current ``torch.backends.quantized.engine``.

    Returns:
        An eval-mode quantized copy taking and returning float tensors.
    """
    _backend(backend)
    clone = _float_copy(model).eval()
    with _quiet_torch_ao():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(clone, set(layer_types), dtype=torch.qint8, inplace=True)


def _as_args(example_input: Tensor | tuple) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


# What torch.fx raises on an untraceable forward: control flow on a traced value
# (TraceError), shapes used as Python ints (TypeError), and assorted others.
_TRACE_ERRORS = (
    torch.fx.proxy.TraceError,
    TypeError,
    RuntimeError,
    AttributeError,
    NotImplementedError,
    ValueError,
)


def _prepare_tree(
    module: nn.Module, example_args: tuple, prepare: Callable[[nn.Module, tuple], nn.Module]
) -> tuple[nn.Module, int]:
    """FX-prepare ``module``; if it cannot be traced, prepare its children (recursively).

    A forward with Python control flow on the input (``if x.dim() == 2: ...``) defeats
    ``torch.fx``, but its children are usually plain stacks of layers. Each traceable child
    is quantized on its own, between a quantize and a dequantize, and the untraced parent
    keeps running in float. Returns the (possibly replaced) module and the number of
    prepared graphs.
    """
    children = list(module.named_children())
    # A bare layer traced on its own becomes a functional call whose packed int8 weight is a
    # plain attribute, missing from state_dict; wrapped, it converts to a quantized module.
    target = module if children else nn.Sequential(module)
    try:
        return prepare(target, example_args), 1
    except _TRACE_ERRORS:
        if not children:
            return module, 0
    captured: dict[str, tuple] = {}

    def capture(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            captured.setdefault(name, args)

        return hook

    hooks = [child.register_forward_pre_hook(capture(name)) for name, child in children]
    was_training = module.training
    try:
        module.eval()  # do not move BatchNorm statistics while capturing example inputs
        with torch.no_grad():
            module(*example_args)
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    count = 0
    for name, child in children:
        if name in captured and any(True for _ in child.parameters()):
            prepared, n = _prepare_tree(child, captured[name], prepare)
            setattr(module, name, prepared)
            count += n
    return module, count


def _is_prepared(module: nn.Module) -> bool:
    return isinstance(module, torch.fx.GraphModule) and any(
        name.startswith("activation_post_process") for name, _ in module.named_children()
    )


def _convert_tree(module: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    if _is_prepared(module):
        return convert_fx(module)
    for name, child in list(module.named_children()):
        setattr(module, name, _convert_tree(child))
    return module


def _untraceable(model: nn.Module) -> ValueError:
    return ValueError(
        f"torch.fx cannot trace {type(model).__name__} nor any of its submodules, so nothing "
        "can be quantized statically; use quantize_dynamic_int8 (Linear layers) or make the "
        "forward free of Python control flow on tensor values and shapes."
    )


def quantize_static_int8(
    model: nn.Module,
    example_input: Tensor | tuple,
    calibration_batches: Iterable[Tensor | tuple],
    *,
    backend: str | None = None,
) -> nn.Module:
    """Post-training static quantization (FX graph mode) calibrated on sample batches.

    Observers record activation ranges while ``calibration_batches`` run through the model;
    then Conv/Linear (fused with a following BatchNorm/ReLU) become int8 kernels. A model
    whose own forward cannot be traced by ``torch.fx`` is quantized child by child.

    Args:
        model: trained float model (not modified).
        example_input: one input (or tuple of inputs) used to trace the model.
        calibration_batches: inputs (or tuples) representative of deployment data, e.g. a
            few hundred transfer-set samples.
        backend: quantized engine, default the current one.

    Returns:
        An eval-mode quantized model taking and returning float tensors.
    """
    engine = _backend(backend)
    clone = _float_copy(model).eval()
    with _quiet_torch_ao():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        mapping = get_default_qconfig_mapping(engine)
        prepared, count = _prepare_tree(
            clone, _as_args(example_input), lambda m, a: prepare_fx(m, mapping, a)
        )
        if count == 0:
            raise _untraceable(model)
        seen = 0
        with torch.no_grad():
            for batch in calibration_batches:
                prepared(*_as_args(batch))
                seen += 1
        if seen == 0:
            raise ValueError(
                "calibration_batches is empty: static quantization needs at least one batch "
                "to observe activation ranges."
            )
        return _convert_tree(prepared).eval()


def prepare_qat(
    model: nn.Module, example_input: Tensor | tuple, *, backend: str | None = None
) -> nn.Module:
    """Insert fake quantization for quantization-aware training (FX graph mode).

    The result is a train-mode model whose parameters are trained with autograd as usual
    (straight-through gradients through the rounding); BatchNorm is folded into the
    preceding convolution. Its observers update only in training mode
    (:func:`freeze_observers_in_eval`). Fine-tune it (e.g. by distillation), then call
    :func:`convert_qat`. A model whose own forward cannot be traced by ``torch.fx`` is
    prepared child by child.

    Args:
        model: float model (not modified).
        example_input: one input (or tuple of inputs) used to trace the model.
        backend: quantized engine, default the current one.
    """
    engine = _backend(backend)
    clone = _float_copy(model).train()
    with _quiet_torch_ao():
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        mapping = get_default_qat_qconfig_mapping(engine)
        prepared, count = _prepare_tree(
            clone, _as_args(example_input), lambda m, a: prepare_qat_fx(m, mapping, a)
        )
    if count == 0:
        raise _untraceable(model)
    freeze_observers_in_eval(prepared)
    return prepared.train()


def _fake_quantizers(model: nn.Module) -> list[nn.Module]:
    from torch.ao.quantization import FakeQuantizeBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether the model carries fake-quantize modules (the output of :func:`prepare_qat`)."""
    return bool(_fake_quantizers(model))


_EVAL_HOOKED = "_kd_eval_hooks"
_EVAL_FROZEN = "_kd_observers_frozen_in_eval"
_SAVED_SWITCHES = "_kd_saved_switches"


def _calibrated(fake_quant: nn.Module) -> Tensor | bool:
    """Whether the observer has seen data (as a 0-d tensor: no device synchronisation).

    A fresh moving-average observer holds ``min_val = +inf`` (per-channel: an empty tensor);
    its fake-quantize would round with ``scale = 1``. Observers without a range (fixed
    qparams) count as calibrated.
    """
    low = getattr(getattr(fake_quant, "activation_post_process", None), "min_val", None)
    if not isinstance(low, Tensor):
        return True
    if low.numel() == 0:
        return False
    return torch.isfinite(low).all()


def _eval_pre_hook(module: nn.Module, args: tuple) -> None:
    if module.training or not module.__dict__.get(_EVAL_FROZEN, False):
        return
    buffers = module._buffers
    saved = {"observer_enabled": buffers["observer_enabled"]}
    buffers["observer_enabled"] = torch.zeros_like(saved["observer_enabled"])
    calibrated = _calibrated(module)
    if calibrated is not True:
        saved["fake_quant_enabled"] = buffers["fake_quant_enabled"]
        switch = saved["fake_quant_enabled"]
        buffers["fake_quant_enabled"] = (
            switch * calibrated.to(switch.dtype) if calibrated is not False else switch * 0
        )
    module.__dict__[_SAVED_SWITCHES] = saved


def _eval_post_hook(module: nn.Module, args: tuple, output: object) -> None:
    saved = module.__dict__.pop(_SAVED_SWITCHES, None)
    if saved:
        module._buffers.update(saved)


def freeze_observers_in_eval(model: nn.Module) -> int:
    """Tie every fake-quantize observer of ``model`` to the module's train/eval mode.

    In training mode nothing changes: observers update the int8 ranges (unless disabled,
    e.g. by ``torch.ao.quantization.disable_observer``). In eval mode, for the duration of
    each forward, the observer is switched off, so validation, test, predict, export and a
    frozen teacher read the model without changing any of its tensors; the fake-quantize
    keeps its own setting, except where the observer has never seen data (its rounding would
    use ``scale = 1``): there the tensor passes through unrounded. The switches are swapped
    for temporary tensors, so ``state_dict()`` never shows the eval-mode values.

    :func:`prepare_qat` calls this; call it yourself on a model prepared by other means.
    Idempotent; survives ``copy.deepcopy`` (the hooks are module-level functions).

    Returns:
        The number of fake-quantize modules of ``model``.
    """
    fake_quants = _fake_quantizers(model)
    for fake_quant in fake_quants:
        if not fake_quant.__dict__.get(_EVAL_HOOKED, False):
            fake_quant.register_forward_pre_hook(_eval_pre_hook)
            fake_quant.register_forward_hook(_eval_post_hook, always_call=True)
            fake_quant.__dict__[_EVAL_HOOKED] = True
        fake_quant.__dict__[_EVAL_FROZEN] = True
    return len(fake_quants)


def _unfreeze_observers(model: nn.Module) -> None:
    """Undo :func:`freeze_observers_in_eval` on ``model``: its observers follow their switches."""
    for fake_quant in _fake_quantizers(model):
        fake_quant.__dict__[_EVAL_FROZEN] = False


def convert_qat(model: nn.Module) -> nn.Module:
    """Turn a model from :func:`prepare_qat` into a real int8 model (eval mode, CPU; a copy).

    ``model`` is left as it was (device, mode, observers).
    """
    if not any(_is_prepared(m) for m in model.modules()):
        raise ValueError(
            "convert_qat expects the model returned by prepare_qat (fake-quantized graph "
            f"modules), got {type(model).__name__} without any."
        )
    clone = copy.deepcopy(model).cpu().eval()
    # torch's conversion runs each weight's fake-quantize once more to fit the int8 grid to
    # the final weights: on this copy the observers work as torch intends.
    _unfreeze_observers(clone)
    with _quiet_torch_ao():
        return _convert_tree(clone).eval()
