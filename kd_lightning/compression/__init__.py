"""Model compression after distillation: second-order pruning, quantization, export, latency.

Pure torch (never imports lightning); the Lightning callbacks in :mod:`kd_lightning.callbacks`
are built on these functions.
"""

from kd_lightning.compression.hessian import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
)
from kd_lightning.compression.pruning import (
    apply_masks,
    channel_saliency,
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
    model_size_bytes,
    prepare_qat,
    quantize_dynamic_int8,
    quantize_static_int8,
)

__all__ = [
    "convert_qat",
    "model_size_bytes",
    "prepare_qat",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "apply_masks",
    "channel_saliency",
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
    "exact_hessian_diagonal",
    "hutchinson_hessian_diagonal",
    "obd_hessian_diagonal",
]
