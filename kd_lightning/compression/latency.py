"""Inference latency of a model on one input batch: warm, repeated, median.

The median of many warm repeats is robust to the scheduler noise of a shared machine; min and
max show the spread. Compare models by ratios measured in one process, side by side, not by
absolute numbers from different runs. On CUDA the device is synchronised around each repeat.

Pure torch; never imports lightning.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

from kd_lightning.modes import eval_mode

__all__ = ["measure_latency"]


def _sync(args: tuple[Tensor, ...]) -> None:
    if any(a.is_cuda for a in args):
        torch.cuda.synchronize()


def measure_latency(
    model: nn.Module,
    example_input: Tensor | tuple,
    repeats: int = 50,
    warmup: int = 10,
) -> dict[str, float]:
    """Time ``model(example_input)`` under ``torch.inference_mode`` in eval mode.

    Args:
        model: any module (float, pruned, quantized, or an exported program's module); its
            training mode is restored afterwards.
        example_input: a tensor or tuple of tensors, batch first (on the model's device).
        repeats: timed calls, >= 1.
        warmup: untimed calls first (allocator, lazy initialisation, caches), >= 0.

    Returns:
        ``{"median_ms", "min_ms", "max_ms", "mean_ms", "per_sample_ms", "batch_size",
        "repeats"}``; ``per_sample_ms`` is the median divided by the batch size.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise ValueError("example_input must be a tensor or a tuple of tensors.")
    batch_size = args[0].shape[0] if args[0].ndim > 0 else 1
    times_ms: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(*args)
        _sync(args)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args)
            _sync(args)
            times_ms.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times_ms)
    return {
        "median_ms": median,
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "per_sample_ms": median / batch_size,
        "batch_size": float(batch_size),
        "repeats": float(repeats),
    }
