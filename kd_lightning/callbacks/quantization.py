"""Quantization-aware distillation, post-training int8 quantization, int8 files.

:class:`QuantizationAwareTraining` puts fake quantization into the student when ``fit`` sets
up (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"): the forward pass rounds weights and activations to int8
grids, gradients pass straight through, so whatever the method trains the student with (the
teacher's soft targets in :class:`~kd_lightning.methods.OfflineDistillation`: quantization-
aware *distillation*) teaches weights that survive int8. At the end of ``fit`` the student is
converted to a real int8 model (``callback.quantized_model``), optionally saved.

:func:`quantize_student` is post-training quantization of a trained student (a checkpoint or
a module): dynamic (int8 weights, activations quantized per batch; Linear layers) or static
(calibrated activation ranges; Conv and Linear). :func:`save_quantized` /
:func:`load_quantized` write and read int8 students; :func:`load_compressed_student` rebuilds
the student of any kd_lightning checkpoint: plain, pruned, or quantization-aware trained.

All of it uses PyTorch's own stack (``torch.ao.quantization`` through
:mod:`kd_lightning.compression.quantization`) and runs on the CPU quantized engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from kd_lightning.callbacks.student import (
    student_of,
    student_path,
)
from kd_lightning.compression.loading import (
    COMPRESSION_KEY,
    qat_record,
)
from kd_lightning.compression.quantization import (
    convert_qat,
    freeze_observers_in_eval,
    is_qat_prepared,
    model_size_bytes,
    prepare_qat,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from kd_lightning.models.spec import instantiate, model_spec
from kd_lightning.teachers import CHECKPOINT_KEY, load_student, read_checkpoint

__all__ = [
    "QUANTIZED_FILE_KEY",
    "QuantizationAwareTraining",
    "load_compressed_student",
    "load_quantized",
    "quantize_student",
    "save_quantized",
]


QUANTIZED_FILE_KEY = "kd_lightning_quantized"
"""Top-level key of an int8 student file written by :func:`save_quantized`."""

SCHEMES = ("dynamic", "static", "qat")


def _example_from(trainer: L.Trainer | None, example_shape: list[int] | None) -> Tensor:
    if example_shape is not None:
        return torch.rand(*example_shape)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None and hasattr(datamodule, "example_batch"):
        example = datamodule.example_batch()["input"]
        if isinstance(example, Tensor):
            return example.detach().cpu()
    raise ValueError(
        "quantization needs an example input to trace the student: use a "
        "TransferSetDataModule (it provides example_batch()) or set example_shape, e.g. "
        "[2, 1, 8, 8]."
    )


class QuantizationAwareTraining(Callback):
    """Fake-quantize the student during ``fit``; convert it to int8 at the end.

    The student is replaced by its ``prepare_qat`` version in ``setup`` (before the optimizer
    is built, so the optimizer trains the fake-quantized weights; BatchNorm is folded into the
    preceding convolution). The observers move the int8 ranges in training steps only:
    validation, test, predict and every other eval-mode forward leave the student as it is
    (:func:`~kd_lightning.compression.freeze_observers_in_eval`). Checkpoints hold the fake-quantized student and resume as such;
    :func:`load_compressed_student` rebuilds it. Start from a trained float student (e.g. a
    ``FromCheckpoint`` student) and fine-tune for a few epochs with a small learning rate.

    Args:
        backend: quantized engine (``"x86"``, ``"fbgemm"``, ``"qnnpack"``); default: the
            current ``torch.backends.quantized.engine``.
        example_shape: shape of an example input for tracing, batch first; default: the
            datamodule's ``example_batch()``.
        freeze_observers_epoch: from this epoch on, the activation ranges stop moving
            (observers disabled) so the last epochs fine-tune against fixed int8 grids;
            ``None`` keeps observing.
        save_path: where to write the int8 student at the end of ``fit``
            (:func:`save_quantized`); ``None`` keeps it in memory only
            (``callback.quantized_model``).
    """

    def __init__(
        self,
        backend: str | None = None,
        example_shape: list[int] | None = None,
        freeze_observers_epoch: int | None = None,
        save_path: str | None = None,
    ) -> None:
        super().__init__()
        if freeze_observers_epoch is not None and freeze_observers_epoch < 0:
            raise ValueError(f"freeze_observers_epoch must be >= 0, got {freeze_observers_epoch}.")
        self.backend = backend
        self.example_shape = list(example_shape) if example_shape is not None else None
        self.freeze_observers_epoch = freeze_observers_epoch
        self.save_path = save_path
        self.quantized_model: nn.Module | None = None
        self.float_spec: dict[str, Any] | None = None
        self._example_shape_used: list[int] | None = None
        self._record: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        student = student_of(pl_module)
        example = _example_from(trainer, self.example_shape)
        self._example_shape_used = list(example.shape)
        self._record = qat_record(student_path(pl_module), example, self.backend)
        if is_qat_prepared(student):
            # Prepared by an earlier setup, or loaded as such (prepare_for_state_dict).
            freeze_observers_in_eval(student)
            return
        self.float_spec = model_spec(student)
        was_training = student.training
        prepared = prepare_qat(student.cpu(), example, backend=self.backend).train(was_training)
        if hasattr(pl_module, "replace_student"):
            pl_module.replace_student(prepared)
        else:  # a user's LightningModule with a plain `student` attribute
            pl_module.student = prepared
        rank_zero_info(
            f"QuantizationAwareTraining: {type(student).__name__} fake-quantized for int8 "
            f"({torch.backends.quantized.engine}); observers update in training mode only."
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.freeze_observers_epoch is not None
            and trainer.current_epoch >= self.freeze_observers_epoch
        ):
            student_of(pl_module).apply(torch.ao.quantization.disable_observer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild the fake-quantized student (:func:`qat_record`).

        Goes to ``checkpoint["kd_lightning"]["compression"]``, where every loader reads it
        (:func:`~kd_lightning.compression.compression_record`).
        """
        if self._record is None:
            return
        metadata = checkpoint.setdefault(CHECKPOINT_KEY, {})
        metadata.setdefault(COMPRESSION_KEY, {}).update(self._record)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = student_of(pl_module)
        self.quantized_model = convert_qat(student)
        rank_zero_info(
            f"QuantizationAwareTraining: int8 student, {model_size_bytes(self.quantized_model):,} "
            "bytes."
        )
        if self.save_path and trainer.is_global_zero:
            save_quantized(
                self.quantized_model,
                self.save_path,
                student_spec=self.float_spec,
                scheme="qat",
                example_shape=self._example_shape_used,
            )


# --------------------------------------------------------------------------------------------
# Post-training quantization and int8 files.
# --------------------------------------------------------------------------------------------


def _as_student(student: nn.Module | str | Path) -> nn.Module:
    if isinstance(student, nn.Module):
        return student
    return load_compressed_student(student)


def quantize_student(
    student: nn.Module | str | Path,
    scheme: Literal["dynamic", "static"] = "dynamic",
    *,
    example_input: Tensor | None = None,
    calibration_batches: list[Tensor] | None = None,
    datamodule: Any = None,
    num_calibration_batches: int = 8,
    backend: str | None = None,
) -> nn.Module:
    """Post-training int8 quantization of a trained student.

    Args:
        student: a module, or a kd_lightning checkpoint path (its student is rebuilt).
        scheme: ``"dynamic"`` (Linear layers; no calibration) or ``"static"`` (Conv and
            Linear; activation ranges calibrated on training batches).
        example_input: input used to trace the model for ``"static"``; default: the first
            calibration batch.
        calibration_batches: input tensors for ``"static"``; default:
            ``num_calibration_batches`` batches of ``datamodule``'s training split.
        datamodule: a :class:`~kd_lightning.data.TransferSetDataModule` for calibration.
        num_calibration_batches: batches taken from ``datamodule``.
        backend: quantized engine; default the current one.

    Returns:
        The int8 model (eval mode; the float student is not modified).
    """
    model = _as_student(student)
    if scheme == "dynamic":
        return quantize_dynamic_int8(model, backend=backend)
    if scheme != "static":
        raise ValueError(f"scheme must be 'dynamic' or 'static', got {scheme!r}.")
    if calibration_batches is None:
        if datamodule is None:
            raise ValueError(
                "static quantization needs calibration data: pass calibration_batches or a "
                "datamodule."
            )
        datamodule.setup("fit")
        inputs = datamodule.dataset("train").inputs
        size = getattr(datamodule, "batch_size", 64)
        calibration_batches = [
            inputs[i : i + size]
            for i in range(0, min(len(inputs), size * num_calibration_batches), size)
        ]
    if not calibration_batches:
        raise ValueError("calibration_batches is empty.")
    example = example_input if example_input is not None else calibration_batches[0]
    return quantize_static_int8(model, example, calibration_batches, backend=backend)


def save_quantized(
    model: nn.Module,
    path: str | Path,
    *,
    student_spec: dict[str, Any] | None,
    scheme: Literal["dynamic", "static", "qat"],
    example_shape: list[int] | None = None,
) -> Path:
    """Write an int8 student: its ``state_dict`` plus how to rebuild the structure.

    Args:
        model: the int8 model.
        path: target file (``.pt``).
        student_spec: the float architecture's spec (``model_spec(student)``).
        scheme: how it was quantized: ``"dynamic"``, ``"static"`` or ``"qat"``.
        example_shape: input shape used for tracing (static, qat).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            QUANTIZED_FILE_KEY: {
                "student_spec": student_spec,
                "scheme": scheme,
                "example_shape": example_shape,
                "backend": torch.backends.quantized.engine,
            },
            "state_dict": model.state_dict(),
        },
        path,
    )
    return path


def _spec_or_error(spec: Any, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ValueError(
            f"{where} does not record the student's architecture (no student_spec); it "
            "cannot be rebuilt."
        )
    return spec


def load_quantized(path: str | Path, data: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild an int8 student written by :func:`save_quantized` (eval mode).

    The file is read with ``weights_only=True`` (it cannot run code when loaded).
    """
    data = read_checkpoint(path, "int8 student file") if data is None else data
    if not isinstance(data, dict) or QUANTIZED_FILE_KEY not in data:
        raise ValueError(f"{str(path)!r} is not an int8 student file written by save_quantized.")
    meta = data[QUANTIZED_FILE_KEY]
    float_model = instantiate(_spec_or_error(meta["student_spec"], str(path))).eval()
    shape = meta.get("example_shape") or None
    example = torch.rand(*shape) if shape else None
    scheme = meta["scheme"]
    if scheme == "dynamic":
        model = quantize_dynamic_int8(float_model, backend=meta.get("backend"))
    elif scheme == "static":
        model = quantize_static_int8(float_model, example, [example], backend=meta.get("backend"))
    else:
        model = convert_qat(prepare_qat(float_model, example, backend=meta.get("backend")))
    model.load_state_dict(data["state_dict"])
    return model.eval()


def load_compressed_student(checkpoint_path: str | Path) -> nn.Module:
    """The student of any kd_lightning checkpoint: plain, pruned (masks on), or QAT.

    A quantization-aware checkpoint gives the fake-quantized float student (``convert_qat``
    of it is the int8 model). An int8 file from :func:`save_quantized` gives the int8 model.
    Every file is read with ``weights_only=True``.
    """
    data = read_checkpoint(checkpoint_path)
    if isinstance(data, dict) and QUANTIZED_FILE_KEY in data:
        return load_quantized(checkpoint_path, data)
    return load_student(checkpoint_path)
