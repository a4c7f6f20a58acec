"""Rows of every process, for state that each process must hold identically (plain torch).

A memory bank updated from the local batch alone drifts apart across DDP processes: each rank
sees only its shard of the data, so rank 0's bank never holds rank 1's updates. Loss modules
that carry such state (:class:`~kd_lightning.losses.CRDLoss`) gather the updated rows of every
process with :func:`gather_rows` and apply the same update everywhere. Outside
``torch.distributed`` (one process) every function returns its input unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes of the default group (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def merge_rows(
    sizes: list[int], index: torch.Tensor, *rows: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Concatenate gathered, padded rows in rank order and keep each index's first occurrence.

    Args:
        sizes: valid rows per process (rank order); process ``r``'s rows are
            ``[r * max(sizes), r * max(sizes) + sizes[r])`` of every tensor.
        index: ``(world * max(sizes),)`` long sample indices, padded per process.
        rows: ``(world * max(sizes), ...)`` tensors aligned with ``index``.

    Returns:
        ``(index, *rows)`` without padding and without repeated indices (a sample that two
        processes hold in the same step, e.g. the ``DistributedSampler``'s padding, is updated
        once, with the lowest rank's row), so every process applies the same update.
    """
    width = max(sizes) if sizes else 0
    keep = torch.cat([
        torch.arange(rank * width, rank * width + size, device=index.device)
        for rank, size in enumerate(sizes)
    ]) if sizes else torch.zeros(0, dtype=torch.long, device=index.device)  # fmt: skip
    index = index[keep]
    first = torch.ones_like(index, dtype=torch.bool)
    if index.numel():
        order = torch.sort(index, stable=True)
        repeated = torch.zeros_like(first)
        repeated[1:] = order.values[1:] == order.values[:-1]
        first[order.indices[repeated]] = False
    return (index[first], *(r[keep][first] for r in rows))


def gather_rows(index: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every process's ``(index, *rows)``, merged by :func:`merge_rows` (a collective call).

    Batches may differ in size across processes (they are padded for the exchange). In one
    process the input comes back unchanged.
    """
    world = world_size()
    if world == 1:
        return (index, *rows)
    size = torch.tensor([index.shape[0]], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    width = max(counts)
    gathered = []
    for tensor in (index, *rows):
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat(parts))
    return merge_rows(counts, *gathered)


def mean_of_exp_log(log_value: torch.Tensor) -> torch.Tensor:
    """``log(mean over processes of exp(log_value))``, elementwise (one process: unchanged).

    CRD's normaliser ``Z`` is a mean over scores; the mean of the per-process means is the
    mean over all processes' batches when they are of equal size.
    """
    world = world_size()
    if world == 1:
        return log_value
    parts = [torch.empty_like(log_value) for _ in range(world)]
    dist.all_gather(parts, log_value.contiguous())
    return torch.stack(parts).logsumexp(dim=0) - math.log(world)
