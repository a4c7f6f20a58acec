"""The batch contract: every batch a method sees is a dict.

``input`` (a tensor, or a dict of tensors passed as ``model(**input)``), ``target`` (long; ``-1``
or ``-100`` where unlabeled or masked), optional ``index`` and cached teacher outputs. A plain
``(input, target)`` tuple from any DataModule, and a Hugging Face style dict (``input_ids``,
``attention_mask``, ..., ``labels``), are normalised to it.
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "pixel_values",
    "inputs_embeds",
)


def normalise_batch(batch: Any) -> dict[str, Any]:
    """A batch as the dict contract (see the module docstring).

    Raises:
        TypeError: a batch of another form; the message names the accepted ones.
    """
    if isinstance(batch, dict):
        if "input" in batch:
            return batch
        model_inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
        if model_inputs:
            rest = {k: v for k, v in batch.items() if k not in MODEL_INPUT_KEYS}
            normalised = {"input": model_inputs, **rest}
            if "labels" in rest:
                normalised["target"] = normalised.pop("labels")
            return normalised
        raise KeyError(
            f"a batch dict needs an 'input' entry (or Hugging Face inputs such as 'input_ids'); "
            f"got keys {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"input": batch[0], "target": batch[1]}
    raise TypeError(
        "a batch must be a dict with 'input' and 'target', a Hugging Face style dict "
        f"('input_ids', ..., 'labels') or an (input, target) tuple; got {type(batch).__name__}"
    )


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a normalised batch."""
    target = batch.get("target")
    if isinstance(target, torch.Tensor):
        return int(target.shape[0])
    inputs = batch["input"]
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])
