"""Float32 islands for loss cores, whatever the surrounding autocast dtype.

Autocast casts matrix products (``mm``, ``bmm``, ``matmul``) to the low-precision dtype even
when their inputs are float32. Gram matrices, pairwise distances and contrastive scores divided
by a small temperature lose too much in bfloat16, so the relational cores run inside
:func:`full_precision` on ``.float()`` inputs.
"""

from __future__ import annotations

import contextlib

import torch


def full_precision(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``reference``'s device for the enclosed block."""
    device_type = reference.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
