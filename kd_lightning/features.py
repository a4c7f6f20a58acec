"""Capture named intermediate outputs of a model with forward hooks, without modifying the model.

Feature-based distillation (FitNets, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets";
attention transfer, Zagoruyko & Komodakis 2017; and their successors) compares what student and
teacher compute *inside* the network. The models stay ordinary ``nn.Module`` s: the layers to
read are named by their paths in ``model.named_modules()`` and read through forward hooks that
exist only for the duration of one step.

Layer spec syntax (one string per captured tensor)::

    "layer3"                 output of module ``layer3`` (the first tensor, see below)
    "layer3:output"          the same, spelled out
    "layer3:input"           first tensor positional input of ``layer3`` (before it runs)
    "blocks.5.attn:output.1" element 1 of the tuple that ``blocks.5.attn`` returns
    "encoder:output.hidden"  key / attribute ``hidden`` of a dict or object output
    "head:input.x"           keyword argument ``x`` of ``head``'s forward
    ":input"                 input of the whole model (the empty path is the root module)
    "lm_head:parameter.weight"  the module's own tensor ``weight`` (a parameter or buffer,
                             read when the module runs; e.g. an output layer for a fused loss)

Selectors after ``output`` / ``input`` are dot-separated and applied in order: an integer
indexes a tuple/list, anything else is a mapping key or an attribute. When the selected value
(or the whole output when there is no selector) is not a tensor, the first tensor found in it,
depth first (tuple/list order, dict insertion order, dataclass field order), is captured: e.g.
``nn.MultiheadAttention`` gives its attention output, ``nn.LSTM`` its output sequence.

Capture keeps the autograd graph (nothing is detached): the student's features carry gradients.
Whether a teacher's features do is up to the caller, who runs the teacher under
``torch.no_grad()``. Captured tensors keep the dtype the module produced (bf16 under autocast).

List valid names with :func:`list_layer_names`; :func:`validate_layer_names` checks a list at
start-up and suggests the nearest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Connectors live in their own module; re-exported so that `kd_lightning.features.<Connector>`
# works as a class_path too.
from kd_lightning.connectors import (
    Conv1x1Connector,
    FeatureMapToTokens,
    LinearConnector,
    TokenPoolConnector,
    TokensToFeatureMap,
    check_feature_shapes,
    suggest_connector,
)

__all__ = [
    "Conv1x1Connector",
    "FeatureCapture",
    "FeatureMapToTokens",
    "FeatureSpec",
    "LinearConnector",
    "TokenPoolConnector",
    "TokensToFeatureMap",
    "check_feature_shapes",
    "feature_shapes",
    "is_compiled",
    "list_layer_names",
    "suggest_connector",
    "unwrap_model",
    "validate_layer_names",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class FeatureSpec:
    """A parsed layer spec: which module, input or output, and which element of it.

    Args:
        spec: the string as written by the user (also the key in the captured features).
        path: module path in ``named_modules()`` of the unwrapped model ("" is the root).
        kind: ``"output"``, ``"input"`` or ``"parameter"``.
        selectors: element selectors applied in order (``int`` index or ``str`` key/attribute).
    """

    spec: str
    path: str
    kind: str
    selectors: tuple[int | str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> FeatureSpec:
        """Parse ``"path[:output|:input][.selector...]"``; raises ``ValueError`` on bad syntax."""
        if not isinstance(spec, str):
            raise ValueError(f"a layer spec must be a string, got {type(spec).__name__}: {spec!r}")
        path, sep, rest = spec.partition(":")
        path = path.strip()
        if not sep:
            return cls(spec=spec, path=path, kind="output")
        kind, _, selector_text = rest.strip().partition(".")
        if kind not in ("output", "input", "parameter") or (
            kind == "parameter" and not selector_text
        ):
            raise ValueError(
                f"invalid layer spec {spec!r}: after ':' expected 'output' or 'input' (or "
                f"'parameter.<name>'), got {rest.strip()!r}. Valid forms: 'layer3', "
                "'layer3:input', 'layer3:output.0', 'layer3:output.key', 'lm_head:parameter.weight'."
            )
        selectors: list[int | str] = []
        if selector_text:
            for part in selector_text.split("."):
                if not part:
                    raise ValueError(f"invalid layer spec {spec!r}: empty selector between dots")
                selectors.append(int(part) if part.lstrip("-").isdigit() else part)
        return cls(spec=spec, path=path, kind=kind, selectors=tuple(selectors))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs through ``torch.compile``."""
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def list_layer_names(model: nn.Module) -> list[str]:
    """All hookable module paths of ``model`` (wrappers removed), in definition order."""
    return [name for name, _ in unwrap_model(model).named_modules()]


def _resolve_module(root: nn.Module, path: str) -> nn.Module | None:
    """Module at ``path`` in ``root``; a leading wrapper prefix (``module.``) is tolerated."""
    candidates = [path]
    stripped = path
    while stripped.startswith(_WRAPPER_PREFIXES):
        stripped = stripped.split(".", 1)[1]
        candidates.append(stripped)
    for candidate in candidates:
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def validate_layer_names(
    model: nn.Module, names: Sequence[str], *, model_name: str = "model"
) -> list[FeatureSpec]:
    """Check layer specs against ``model`` at start-up and return them parsed.

    Args:
        model: the model whose layers are named (DDP / compile wrappers are looked through).
        names: layer specs, see the module docstring for the syntax.
        model_name: how to call the model in error messages (``"student"``, ``"teacher"``).

    Raises:
        ValueError: a spec is malformed, listed twice, or names no module; the message lists
            the closest valid names for every unknown one and how to list all of them.
    """
    root = unwrap_model(model)
    all_names = [name for name, _ in root.named_modules()]
    param_names = {name for name, _ in root.named_parameters()} | {
        name for name, _ in root.named_buffers()
    }
    specs = [FeatureSpec.parse(name) for name in names]
    seen: set[str] = set()
    problems: list[str] = []
    for spec in specs:
        if spec.spec in seen:
            problems.append(f"{spec.spec!r} is listed twice")
            continue
        seen.add(spec.spec)
        if _resolve_module(root, spec.path) is not None:
            continue
        path = spec.path
        while path.startswith(_WRAPPER_PREFIXES):
            path = path.split(".", 1)[1]
        if path in param_names:
            owner = path.rpartition(".")[0]
            problems.append(
                f"{spec.path!r} is a parameter or buffer, not a module; hook its module {owner!r}"
            )
            continue
        close = difflib.get_close_matches(path, all_names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match"
        problems.append(f"no layer {spec.path!r} ({hint})")
    if problems:
        raise ValueError(
            f"{model_name} ({type(root).__name__}): "
            + "; ".join(problems)
            + ". List the valid names with kd_lightning.features.list_layer_names(model) "
            "(the names of model.named_modules())."
        )
    return specs


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _select(value: Any, spec: FeatureSpec) -> torch.Tensor:
    for selector in spec.selectors:
        try:
            if isinstance(selector, int) and isinstance(value, (tuple, list)):
                value = value[selector]
            elif isinstance(value, Mapping):
                value = value[selector if selector in value else str(selector)]
            else:
                value = getattr(value, str(selector))
        except (IndexError, KeyError, AttributeError) as error:
            raise ValueError(
                f"layer spec {spec.spec!r}: cannot select {selector!r} from the "
                f"{spec.kind} of {spec.path!r} (a {type(value).__name__})"
            ) from error
    tensor = _first_tensor(value)
    if tensor is None:
        raise TypeError(
            f"layer spec {spec.spec!r}: the {spec.kind} of {spec.path!r} contains no tensor "
            f"(got {type(value).__name__}); pick an element with e.g. '{spec.path}:{spec.kind}.0'"
        )
    return tensor


class _MissingFeatures(dict):
    """Captured features; a missing key explains that the layer did not run."""

    def __missing__(self, key: str) -> torch.Tensor:
        raise KeyError(
            f"no feature captured for {key!r} in this step: the layer did not run during the "
            f"forward pass inside the `with` block (captured: {sorted(self)})"
        )


class FeatureCapture:
    """Capture named intermediate tensors of a model during one forward pass.

    Hooks are registered when the ``with`` block is entered and removed when it exits, and the
    capture drops its references to the tensors then, so nothing accumulates across steps.
    ``with capture as feats`` binds the per-step dict ``{spec: tensor}``, which stays valid
    after the block for the caller to use in the loss::

        capture = FeatureCapture(student, ["layer2", "layer3:input"])
        with capture as feats:
            logits = student(x)
        loss = mse(connector(feats["layer2"]), teacher_feats["layer2"])

    ``capture.features`` is the same dict while inside the block. A module that runs several
    times in one block (weight sharing, two calls of the model) keeps its last call's tensor.
    Modules with in-place operations (``nn.ReLU(inplace=True)``) overwrite their input after it
    is captured: capture the previous module's output instead. ``nn.DataParallel`` on several
    GPUs is not supported (replicas overwrite each other); use DDP.

    Compiled models (``torch.compile(model)``, ``model.compile()``, or compiled submodules):
    a compiled graph runs the hooks that existed when it was traced and does not look for new
    ones, so hooks added per step would be skipped. For such a model the hooks are registered
    once, here, and stay (they store tensors only inside the ``with`` block); compiled graphs
    traced before are discarded (``torch.compiler.reset()``) so the next call traces the
    hooks into the graph. The capture then costs no graph break and no recompilation per step.
    :meth:`close` removes the hooks.

    Args:
        model: the model to read from; may be wrapped in DDP / DataParallel / ``torch.compile``
            (names are resolved on the inner module, a leading ``"module."`` is ignored).
        layers: layer specs (see :mod:`kd_lightning.features` for the syntax). Validated here:
            an unknown name raises ``ValueError`` naming the closest valid ones.
        model_name: how to call the model in error messages.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], *, model_name: str = "model"
    ) -> None:
        if isinstance(layers, str):
            layers = [layers]
        self.specs = validate_layer_names(model, layers, model_name=model_name)
        root = unwrap_model(model)
        self._modules = [_resolve_module(root, spec.path) for spec in self.specs]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._features: _MissingFeatures | None = None
        self.persistent = is_compiled(model)
        """Hooks stay registered between steps (a compiled model, see above)."""
        if self.persistent:
            self._register()
            torch.compiler.reset()  # graphs traced before the hooks existed would skip them

    @property
    def layers(self) -> list[str]:
        """The layer specs, in the order given (also the keys of :attr:`features`)."""
        return [spec.spec for spec in self.specs]

    @property
    def active(self) -> bool:
        """Whether hooks are currently registered (inside the ``with`` block)."""
        return self._features is not None

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """The tensors captured so far in the current ``with`` block, keyed by layer spec."""
        if self._features is None:
            raise RuntimeError(
                "FeatureCapture.features is only available inside `with capture:`; use "
                "`with capture as feats:` to keep the features after the block."
            )
        return self._features

    def _make_hook(self, spec: FeatureSpec):
        # The hook stores into the current step's dict; outside a `with` block there is none
        # (only a persistent hook of a compiled model runs then, and it stores nothing).
        if spec.kind != "input":

            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                store = self._features
                if store is not None:
                    store[spec.spec] = _select(module if spec.kind == "parameter" else output, spec)

        else:
            # Integer selectors index the positional args, names the keyword args; without a
            # selector the first tensor among both is taken.
            first = spec.selectors[0] if spec.selectors else None

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                store = self._features
                if store is None:
                    return
                if isinstance(first, int):
                    value: Any = args
                elif isinstance(first, str):
                    value = kwargs
                else:
                    value = (args, kwargs)
                store[spec.spec] = _select(value, spec)

        return hook

    def _register(self) -> None:
        try:
            for spec, module in zip(self.specs, self._modules, strict=True):
                hook = self._make_hook(spec)
                if spec.kind != "input":
                    handle = module.register_forward_hook(hook)
                else:
                    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook (a persistent capture's too); the capture is not used after."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features = None

    def __enter__(self) -> dict[str, torch.Tensor]:
        if self._features is not None:
            raise RuntimeError("FeatureCapture is already active; it cannot be entered twice")
        store = _MissingFeatures()
        if not self.persistent:
            self._register()
        self._features = store
        return store

    def __exit__(self, *exc_info: object) -> None:
        self._features = None
        if not self.persistent:
            self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers})"


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def feature_shapes(
    model: nn.Module, layers: Sequence[str], *args: Any, **kwargs: Any
) -> dict[str, torch.Size]:
    """Shapes of the captured layers for one forward ``model(*args, **kwargs)``.

    Meant for start-up checks (with :func:`kd_lightning.connectors.check_feature_shapes`): runs
    under ``no_grad`` and in eval mode, so BatchNorm statistics and training flags are left as
    they were.

    Raises:
        ValueError: a layer name is unknown (see :func:`validate_layer_names`).
        RuntimeError: a layer did not run during the forward pass.
    """
    capture = FeatureCapture(model, layers)
    try:
        with torch.no_grad(), _eval_mode(model), capture as feats:
            model(*args, **kwargs)
    finally:
        capture.close()
    missing = [spec for spec in capture.layers if spec not in feats]
    if missing:
        raise RuntimeError(f"layers {missing} did not run during the forward pass")
    return {spec: feats[spec].shape for spec in capture.layers}
