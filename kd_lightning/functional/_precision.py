"""Precision rules shared by every loss core: upcast low precision, never downcast.

- :func:`upcast`: float16 and bfloat16 inputs are computed in float32 (a softmax at temperature
  T, a Gram matrix or a small KL loses too much in 16 bits); float32 and float64 inputs keep
  their dtype, so a float64 check (gradcheck, a reference computation) stays float64.
- :func:`full_precision`: autocast casts matrix products (``mm``, ``bmm``, ``matmul``) to the
  low-precision dtype even when their inputs are float32. Gram matrices, pairwise distances and
  contrastive scores divided by a small temperature lose too much in bfloat16, so the
  relational cores run inside it on upcast inputs.
"""

from __future__ import annotations

import contextlib

import torch

_KEEP = (torch.float32, torch.float64)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16, bfloat16 or an integer type; float32/float64 unchanged."""
    return x if x.dtype in _KEEP else x.float()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a core computes in for these inputs: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def full_precision(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``reference``'s device for the enclosed block."""
    device_type = reference.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
