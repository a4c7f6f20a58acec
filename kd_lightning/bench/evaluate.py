"""Evaluating a finished study run: test accuracy, agreement with its teacher, size, latency.

Works with any LightningDataModule that has a ``test_dataloader``: batches go through the data
module's own ``on_before_batch_transfer``/``on_after_batch_transfer`` hooks (as in a Trainer;
the library's transfer sets use their split-aware ``transform_batch``) and are normalised to the batch contract (a dict with ``input`` and ``target``; an
``(input, target)`` tuple is accepted). ``input`` may be a tensor or a dict of tensors (called as
``model(**input)``); logits may be ``(B, C)`` or per token ``(B, L, V)``, where positions with
target ``-100`` (padding, masked tokens) are left out.

Causal language models (next-token targets): when the targets are the input ids themselves
(Hugging Face's ``labels = input_ids``, as :class:`~kd_lightning.data.CausalLMTransferSet`
gives) the logits at position ``t`` are scored on the target at ``t + 1`` (the last position of
each block has no target), as the training losses and ``<stage>/perplexity`` do
(``shift=True``). Per-token logits also get a perplexity: ``exp`` of the mean token negative
log-likelihood over the counted tokens, ``exp(-sum_n log softmax(z_n)[y_n] / N)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from kd_lightning.modes import eval_mode

IGNORED_TOKEN = -100


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of tensors (Hugging Face style), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def implements(datamodule: Any, hook: str) -> bool:
    """Whether ``datamodule`` defines ``hook`` (e.g. ``test_dataloader``) itself."""
    method = getattr(type(datamodule), hook, None)
    if method is None:
        return False
    return method is not getattr(L.LightningDataModule, hook, None) or hook in vars(datamodule)


def batches(datamodule: Any, split: str = "test") -> Iterator[dict[str, Any]]:
    """Normalised batches of ``split`` (``"test"``, ``"val"`` or ``"train"``), as a Trainer sees them."""
    from kd_lightning.data.batch import normalise_batch

    hook = f"{split}_dataloader"
    if not implements(datamodule, hook):
        raise ValueError(
            f"{type(datamodule).__name__} has no {hook}(); a study evaluates every run on the "
            f"{split} split: give the data module a {hook}() method"
        )
    datamodule.setup({"train": "fit", "val": "validate"}.get(split, split))
    for batch in getattr(datamodule, hook)():
        if hasattr(datamodule, "transform_batch"):  # the library's transfer sets: split-aware
            batch = datamodule.transform_batch(batch, split)
        else:
            batch = datamodule.on_before_batch_transfer(batch, 0)
            batch = datamodule.on_after_batch_transfer(batch, 0)
        yield normalise_batch(batch)


def next_token_targets(batch: dict[str, Any]) -> bool:
    """Whether per-token targets are next-token labels: ``(B, L)`` targets equal to the input's
    ``input_ids`` at every counted position (at least one), the causal-LM convention."""
    target, inputs = batch.get("target"), batch.get("input")
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if target is None or ids is None or target.dim() != 2 or ids.shape != target.shape:
        return False
    counted = target != IGNORED_TOKEN
    return bool(counted.any()) and bool((target == ids)[counted].all())


def aligned(
    logits: torch.Tensor, target: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logits and targets paired for scoring: with ``shift``, position ``t`` with the
    target at ``t + 1`` (``(B, L-1, V)`` and ``(B, L-1)``); otherwise unchanged."""
    if shift and logits.dim() == 3 and target.dim() == 2:
        return logits[:, :-1], target[:, 1:]
    return logits, target


def _token_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of the targets >= 0, and how many there are."""
    flat, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    keep = flat_target >= 0
    log_q = torch.log_softmax(flat[keep].double(), dim=-1)
    picked = log_q.gather(-1, flat_target[keep].unsqueeze(-1))
    return float(-picked.sum()), int(keep.sum())


@torch.no_grad()
def scores(
    models: list[nn.Module | None], datamodule: Any, split: str = "test", shift: bool | None = None
) -> tuple[list[torch.Tensor | None], torch.Tensor, list[float | None]]:
    """Top-1 predictions of each model (``None`` stays ``None``), the targets (both flattened,
    aligned by ``shift``) and each model's perplexity (``None`` for ``(B, C)`` logits).

    ``shift=None`` reads it from the first batch (:func:`next_token_targets`).
    """
    from kd_lightning.teachers import output_logits

    outs: list[list[torch.Tensor]] = [[] for _ in models]
    nll = [[0.0, 0] for _ in models]
    targets = []
    with eval_mode(*models):
        for batch in batches(datamodule, split):
            if shift is None:
                shift = next_token_targets(batch)
            raw_target = batch["target"]
            for i, model in enumerate(models):
                if model is None:
                    continue
                logits, target = aligned(
                    output_logits(call_model(model, batch["input"])), raw_target, shift
                )
                outs[i].append(logits.argmax(-1).flatten())
                if logits.dim() == 3:
                    total, count = _token_nll(logits, target)
                    nll[i][0] += total
                    nll[i][1] += count
            next_token = shift and raw_target.dim() == 2
            targets.append((raw_target[:, 1:] if next_token else raw_target).flatten())
    if not targets:
        raise ValueError(
            f"the {split} split of {type(datamodule).__name__} is empty; a study needs {split} samples"
        )
    perplexity = [math.exp(t / n) if n else None for t, n in nll]
    return [torch.cat(o) if o else None for o in outs], torch.cat(targets), perplexity


def predictions(
    models: list[nn.Module | None], datamodule: Any, shift: bool | None = None
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Top-1 predictions of each model (``None`` stays ``None``) and the targets, flattened."""
    predicted, target, _ = scores(models, datamodule, "test", shift)
    return predicted, target


def evaluate(
    student: nn.Module,
    datamodule: Any,
    reference: nn.Module | None,
    best_student: nn.Module | None = None,
    shift: bool | None = None,
) -> dict[str, Any]:
    """Test accuracy of the (last-epoch) student and of its best-val snapshot; top-1 agreement
    of the student with ``reference`` (its teacher). Per-token logits add ``test_perplexity``
    (and ``test_perplexity_best_val``, ``reference_test_perplexity``) and, when the data module
    has a ``val_dataloader``, the student's ``val_perplexity``.

    Accuracy counts labeled samples (target >= 0); agreement counts every sample (unlabeled
    ones too, target -1) except ignored token positions (target -100). ``shift``: next-token
    targets (causal LMs); ``None`` reads it from the batches (:func:`next_token_targets`).
    """
    (last, best, teacher), target, perplexity = scores(
        [student, best_student, reference], datamodule, "test", shift
    )
    labeled = target >= 0
    if not labeled.any():
        raise ValueError("the test split has no labeled samples (every target < 0)")
    result: dict[str, Any] = {"test_acc": (last == target)[labeled].float().mean().item()}
    if best is not None:
        result["test_acc_best_val"] = (best == target)[labeled].float().mean().item()
    if teacher is not None:
        counted = target != IGNORED_TOKEN
        result["agreement"] = (last == teacher)[counted].float().mean().item()
    if perplexity[0] is not None:
        names = ("test_perplexity", "test_perplexity_best_val", "reference_test_perplexity")
        result.update({k: v for k, v in zip(names, perplexity, strict=True) if v is not None})
        if implements(datamodule, "val_dataloader"):
            result["val_perplexity"] = scores([student], datamodule, "val", shift)[2][0]
    return result


def val_is_test(datamodule: Any) -> bool:
    """Whether validation runs on the test split (the CIFAR protocol with ``val_size: 0``)."""
    if not hasattr(datamodule, "raw_split"):
        return False
    (vx, vy), (tx, ty) = datamodule.raw_split("val"), datamodule.raw_split("test")
    return vx is tx or (vx.shape == tx.shape and torch.equal(vy, ty) and torch.equal(vx, tx))


class _KeywordCall(nn.Module):
    """``forward(*tensors)`` -> ``model(**dict(zip(keys, tensors)))``, to time dict-input models."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.keys, tensors, strict=True)))


def latency_per_sample_ms(student: nn.Module, datamodule: Any) -> float:
    """Median CPU latency (ms) of the student's forward on one test sample, warm."""
    from kd_lightning.compression.latency import measure_latency

    inputs = next(batches(datamodule, "test"))["input"]
    model = copy.deepcopy(student).cpu()
    if isinstance(inputs, dict):
        keys = sorted(inputs)
        model = _KeywordCall(model, keys)
        example: Any = tuple(inputs[k][:1].cpu() for k in keys)
    else:
        example = inputs[:1].cpu()
    return measure_latency(model, example, repeats=25, warmup=5)["median_ms"]


def agreement_source(run_needs: dict[str, str], run_name: str, reference: str | None) -> str | None:
    """The run whose student a run's agreement is measured to: its first dependency, else the
    study's reference teacher (``None`` for the reference teacher itself)."""
    deps = list(dict.fromkeys(run_needs.values()))
    source = deps[0] if deps else reference
    return None if source == run_name else source
