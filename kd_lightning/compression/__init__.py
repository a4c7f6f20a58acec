"""Model compression after distillation: second-order pruning, quantization, export, latency.

* :mod:`~kd_lightning.compression.hessian`: Hessian diagonals (exact, Hutchinson, OBD).
* :mod:`~kd_lightning.compression.pruning`: OBD / magnitude saliency, global masks,
  checkpointable masks, sparsity schedules.
* :mod:`~kd_lightning.compression.masks`: masks that keep the parameter order, re-installed
  before a pruned state loads.
* :mod:`~kd_lightning.compression.quantization`: int8 dynamic / static PTQ and QAT.
* :mod:`~kd_lightning.compression.export`: ONNX and ``torch.export`` with equivalence checks.
* :mod:`~kd_lightning.compression.latency`: warm median inference latency.
* :mod:`~kd_lightning.compression.loading`: load a pruned or quantization-aware trained state
  into a fresh float model (:func:`prepare_for_state_dict`), for every loader.

Pure torch (never imports lightning); the Lightning callbacks in :mod:`kd_lightning.callbacks`
are built on these functions.
"""

from kd_lightning.compression.export import (
    ExportMismatchError,
    check_equivalence,
    export_onnx,
    export_program,
    load_exported,
)
from kd_lightning.compression.hessian import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
)
from kd_lightning.compression.latency import measure_latency
from kd_lightning.compression.loading import (
    COMPRESSION_KEY,
    compression_record,
    is_qat_state,
    load_compressed_state_dict,
    prepare_for_state_dict,
    qat_record,
)
from kd_lightning.compression.masks import (
    install_masks,
    install_pruning_for_state_dict,
    is_pruned_state,
    register_pruning_reload_hooks,
)
from kd_lightning.compression.pruning import (
    apply_masks,
    channel_saliency,
    copy_with_masks_applied,
    effective_parameters,
    global_prune_masks,
    load_pruned_state_dict,
    magnitude_saliency,
    make_pruning_permanent,
    obd_saliency,
    select_parameters,
    sparsity_by_parameter,
    sparsity_of,
    sparsity_schedule,
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

__all__ = [
    "COMPRESSION_KEY",
    "ExportMismatchError",
    "apply_masks",
    "channel_saliency",
    "check_equivalence",
    "compression_record",
    "convert_qat",
    "copy_with_masks_applied",
    "effective_parameters",
    "exact_hessian_diagonal",
    "export_onnx",
    "export_program",
    "freeze_observers_in_eval",
    "global_prune_masks",
    "hutchinson_hessian_diagonal",
    "install_masks",
    "install_pruning_for_state_dict",
    "is_pruned_state",
    "is_qat_prepared",
    "is_qat_state",
    "load_compressed_state_dict",
    "load_exported",
    "load_pruned_state_dict",
    "magnitude_saliency",
    "make_pruning_permanent",
    "measure_latency",
    "model_size_bytes",
    "obd_hessian_diagonal",
    "obd_saliency",
    "prepare_for_state_dict",
    "prepare_qat",
    "qat_record",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "register_pruning_reload_hooks",
    "select_parameters",
    "sparsity_by_parameter",
    "sparsity_of",
    "sparsity_schedule",
]
