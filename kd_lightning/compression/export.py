"""Export a trained student for deployment (ONNX, ``torch.export``) and check it still agrees.

* :func:`export_onnx` uses the ``torch.export``-based ONNX exporter (``dynamo=True``, the
  default since torch 2.9; it needs the ``onnx`` and ``onnxscript`` packages) with a dynamic
  batch axis. :func:`load_exported` runs ``.onnx`` files with ONNX Runtime (``onnxruntime``).
* :func:`export_program` saves a ``torch.export`` ``ExportedProgram`` (``.pt2``), the
  successor of TorchScript: ``torch.jit.trace`` / ``script`` are deprecated in torch 2.13, so
  no TorchScript path is offered.
* :func:`check_equivalence` runs the exported artefact next to the eager model and raises
  :class:`ExportMismatchError` when they differ by more than a tolerance.

An ONNX file is self-contained (weights inside) unless the weights pass ONNX's 2 GB protobuf
limit; then they go to ``<name>.onnx.data`` beside it (:func:`onnx_data_file` names it).
Every file is written atomically: into a new folder beside the target, then moved into place
with ``os.replace`` (:func:`staged_output`), so an interrupted export never leaves half a file
under the target name.

The batch axis is exported as dynamic. ``torch.export`` specialises a dimension of size 1 to
a constant, so an example batch of size 1 is repeated to size 2 before export.

The models are exported in eval mode (BatchNorm running statistics, no dropout); the mode of
the module passed in is restored afterwards. Int8 models from
:mod:`kd_lightning.compression.quantization` use torch's quantized CPU kernels, which these
exporters do not translate: export the float (or pruned) student.

Pure torch plus the optional ONNX packages; never imports lightning.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils._pytree import tree_leaves

from kd_lightning.compression.pruning import copy_with_masks_applied
from kd_lightning.modes import eval_mode

__all__ = [
    "ExportMismatchError",
    "check_equivalence",
    "export_onnx",
    "export_program",
    "load_exported",
    "onnx_data_file",
    "staged_output",
]

# Weights above this size go to an external data file: ONNX files are protobufs, capped at 2 GB.
EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the eager model's beyond the tolerance."""


def onnx_data_file(path: str | Path) -> Path:
    """The external weights file an ONNX export writes beside ``path`` when it needs one."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


@contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Write ``path`` (and any companion file) atomically.

    Yields a path with ``path``'s name inside a new folder beside it. When the block succeeds,
    every file written into that folder is moved next to ``path`` with ``os.replace`` (atomic
    on one file system), ``path`` itself last; the folder is removed in every case.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging / path.name
        for staged in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
            os.replace(staged, path.parent / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _as_args(example_input: Tensor | tuple) -> tuple[Tensor, ...]:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) and a.ndim >= 1 for a in args):
        raise ValueError(
            "example_input must be a tensor, or a tuple of tensors, with a leading batch axis."
        )
    # A batch of 1 would be specialised to the constant 1 by torch.export.
    return tuple(a.repeat(2, *([1] * (a.ndim - 1))) if a.shape[0] == 1 else a for a in args)


def _dynamic_batch(args: tuple[Tensor, ...]) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in args)


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the export, the caller's mode restored; torch's own export-time
    deprecation warning (``isinstance(treespec, LeafSpec)``, raised inside torch 2.13's
    exporters) silenced, since no caller can act on it."""
    with eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        yield model


def _deployable(model: nn.Module) -> nn.Module:
    """The model itself, or a copy with pruning masks baked in (the hooks do not export)."""
    has_masks = any(
        isinstance(h, prune.BasePruningMethod)
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
    )
    return copy_with_masks_applied(model) if has_masks else model


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple,
    path: str | Path,
    *,
    opset_version: int | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export to ONNX with a dynamic batch axis, atomically (see :func:`staged_output`).

    Args:
        model: the (float) student; exported in eval mode, its mode restored after.
        example_input: a tensor or tuple of tensors, batch first.
        path: target ``.onnx`` file (parent directories are created).
        opset_version: ONNX opset; ``None`` takes the exporter's default.
        external_data: write the weights to :func:`onnx_data_file` instead of into the file.
            ``None``: only when they exceed ONNX's 2 GB limit (1.8 GB of parameters and
            buffers), so a small model is one self-contained file.

    Returns:
        The path written. Inputs are named ``input`` (``input_0``, ``input_1``, ... for
        several), outputs ``output`` (``output_0``, ...).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "export_onnx needs the ONNX packages: pip install 'kd_lightning[export]' "
            "(onnx, onnxscript, onnxruntime)."
        ) from error
    path = Path(path)
    args = _as_args(example_input)
    target = _deployable(model)
    if external_data is None:
        tensors = [*target.parameters(), *target.buffers()]
        external_data = sum(t.numel() * t.element_size() for t in tensors) > EXTERNAL_DATA_BYTES
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    # The exporter logs one warning per torchvision operator it cannot register when
    # torchvision is absent (this project never installs it): not relevant to our models.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with _eval_mode(target), torch.no_grad(), staged_output(path) as staged:
            with_outputs = target(*args)
            leaves = tree_leaves(with_outputs)
            output_names = (
                ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]
            )
            torch.onnx.export(
                target,
                args,
                str(staged),
                dynamo=True,
                external_data=external_data,
                dynamic_shapes=_dynamic_batch(args),
                input_names=input_names,
                output_names=output_names,
                opset_version=opset_version,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    return path


def export_program(model: nn.Module, example_input: Tensor | tuple, path: str | Path) -> Path:
    """Save a ``torch.export`` program (``.pt2``) with a dynamic batch axis, atomically.

    Load it back with :func:`load_exported` (or ``torch.export.load(path).module()``); it runs
    without the model's Python class.

    Args:
        model: the student; exported in eval mode, its mode restored after.
        example_input: a tensor or tuple of tensors, batch first.
        path: target file, conventionally ``*.pt2``.
    """
    path = Path(path)
    args = _as_args(example_input)
    target = _deployable(model)
    with _eval_mode(target), torch.no_grad():
        program = torch.export.export(target, args, dynamic_shapes=_dynamic_batch(args))
    with staged_output(path) as staged:
        torch.export.save(program, str(staged))
    return path


def load_exported(path: str | Path) -> Callable[..., object]:
    """Load an exported model as a callable taking and returning torch tensors.

    ``.onnx`` runs in ONNX Runtime (CPU provider); ``.pt2`` is a ``torch.export`` program.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}.")
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "running an .onnx file needs onnxruntime: pip install 'kd_lightning[export]'."
            ) from error
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*args: Tensor) -> list[Tensor]:
            if len(args) != len(names):
                raise ValueError(f"{path.name} takes {len(names)} input(s) {names}.")
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
            return [torch.from_numpy(o) for o in session.run(None, feeds)]

        return run_onnx
    program = torch.export.load(str(path)).module()

    def run_program(*args: Tensor) -> object:
        with torch.no_grad():
            return program(*args)

    return run_program


def check_equivalence(
    reference_model: nn.Module,
    exported_path: str | Path,
    inputs: Tensor | tuple | Sequence[Tensor | tuple],
    atol: float = 1e-4,
) -> float:
    """Largest absolute difference between the eager model and its exported artefact.

    Args:
        reference_model: the eager model (run in eval mode, its mode restored after).
        exported_path: an ``.onnx`` or ``.pt2`` file from this module.
        inputs: one batch (a tensor, or a tuple of tensors for a multi-input model) or a
            list of batches; use several batch sizes to check the dynamic batch axis.
        atol: tolerance on the maximum absolute difference.

    Returns:
        The maximum absolute difference over all outputs and batches.

    Raises:
        ExportMismatchError: the difference exceeds ``atol``, or the outputs differ in
            number or shape.
    """
    run = load_exported(exported_path)
    if isinstance(inputs, Tensor | tuple):
        batches = [inputs]
    else:
        batches = list(inputs)
    if not batches:
        raise ValueError("inputs is empty: pass at least one batch.")
    worst = 0.0
    with _eval_mode(reference_model), torch.no_grad():
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            expected = tree_leaves(reference_model(*args))
            actual = tree_leaves(run(*args))
            if len(expected) != len(actual):
                raise ExportMismatchError(
                    f"{exported_path} returns {len(actual)} output(s), the model {len(expected)}."
                )
            for want, got in zip(expected, actual, strict=True):
                if tuple(want.shape) != tuple(got.shape):
                    raise ExportMismatchError(
                        f"output shape {tuple(got.shape)} from {exported_path} differs from the "
                        f"model's {tuple(want.shape)} (batch {tuple(args[0].shape)})."
                    )
                diff = (want.float().cpu() - got.float().cpu()).abs().max().item()
                worst = max(worst, diff)
    if not worst <= atol:
        raise ExportMismatchError(
            f"exported model {exported_path} differs from the eager model by {worst:.3g} > "
            f"atol={atol:g}; check for train-mode layers, data-dependent control flow, or "
            "raise atol for reduced-precision exports."
        )
    return worst
