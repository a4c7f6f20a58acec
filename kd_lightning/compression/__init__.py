"""Model compression after distillation: second-order pruning, quantization, export, latency.

Pure torch (never imports lightning); the Lightning callbacks in :mod:`kd_lightning.callbacks`
are built on these functions.
"""

from kd_lightning.compression.hessian import (
    exact_hessian_diagonal,
    hutchinson_hessian_diagonal,
    obd_hessian_diagonal,
)

__all__ = [
    "exact_hessian_diagonal",
    "hutchinson_hessian_diagonal",
    "obd_hessian_diagonal",
]
