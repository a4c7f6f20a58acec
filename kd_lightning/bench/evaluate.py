"""Evaluating a finished study run: test accuracy, agreement with its teacher, size, latency.

Works with any LightningDataModule that has a ``test_dataloader``: batches go through the data
module's own ``on_before_batch_transfer``/``on_after_batch_transfer`` hooks (as in a Trainer;
the library's transfer sets use their split-aware ``transform_batch``) and are normalised to the batch contract (a dict with ``input`` and ``target``; an
``(input, target)`` tuple is accepted). ``input`` may be a tensor or a dict of tensors (called as
``model(**input)``); logits may be ``(B, C)`` or per token ``(B, L, V)``, where positions with
target ``-100`` (padding, masked tokens) are left out.
"""

from __future__ import annotations

import copy
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


def _flat_predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1).flatten()


@torch.no_grad()
def predictions(
    models: list[nn.Module | None], datamodule: Any
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Top-1 predictions of each model (``None`` stays ``None``) and the targets, flattened."""
    from kd_lightning.teachers import output_logits

    outs: list[list[torch.Tensor]] = [[] for _ in models]
    targets = []
    with eval_mode(*models):
        for batch in batches(datamodule, "test"):
            targets.append(batch["target"].flatten())
            for i, model in enumerate(models):
                if model is not None:
                    logits = output_logits(call_model(model, batch["input"]))
                    outs[i].append(_flat_predictions(logits))
    if not targets:
        raise ValueError(
            f"the test split of {type(datamodule).__name__} is empty; a study needs test samples"
        )
    return [torch.cat(o) if o else None for o in outs], torch.cat(targets)


def evaluate(
    student: nn.Module,
    datamodule: Any,
    reference: nn.Module | None,
    best_student: nn.Module | None = None,
) -> dict[str, Any]:
    """Test accuracy of the (last-epoch) student and of its best-val snapshot; top-1 agreement
    of the student with ``reference`` (its teacher).

    Accuracy counts labeled samples (target >= 0); agreement counts every sample (unlabeled
    ones too, target -1) except ignored token positions (target -100).
    """
    (last, best, teacher), target = predictions([student, best_student, reference], datamodule)
    labeled = target >= 0
    if not labeled.any():
        raise ValueError("the test split has no labeled samples (every target < 0)")
    result: dict[str, Any] = {"test_acc": (last == target)[labeled].float().mean().item()}
    if best is not None:
        result["test_acc_best_val"] = (best == target)[labeled].float().mean().item()
    if teacher is not None:
        counted = target != IGNORED_TOKEN
        result["agreement"] = (last == teacher)[counted].float().mean().item()
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
