"""DistilBERT-style students: a shallower copy of a transformer teacher.

Sanh et al. (2019), "DistilBERT, a distilled version of BERT", section 3: the student keeps the
teacher's architecture with fewer layers and is initialised from the teacher, "taking one layer
out of two". :func:`shallow_copy` builds such a student from any Hugging Face model whose
transformer blocks sit in one ``nn.ModuleList`` (BERT-like ``encoder.layer``, GPT-like
``transformer.h``, Llama-like ``model.layers``, ...): everything outside the block stack
(embeddings, final norm, heads) is copied as it is, and student block ``i`` is a copy of
teacher block ``layers[i]``. In a config::

    student:
      class_path: kd_lightning.models.ShallowCopy
      init_args: {pretrained: /path/to/teacher_dir, task: sequence-classification, layers: [0, 2, 4]}
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kd_lightning.models.hf import HFModel, hf_spec, resolve_path
from kd_lightning.models.spec import SPEC_ATTRIBUTE


def find_layer_stack(model: nn.Module, layer_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The path and module of the transformer block stack of ``model``.

    Args:
        model: a Hugging Face model (its ``config.num_hidden_layers`` counts the blocks).
        layer_path: the stack's path (``"bert.encoder.layer"``); default: the one
            ``nn.ModuleList`` with ``num_hidden_layers`` entries.

    Raises:
        ValueError: no such stack, or several (then pass ``layer_path``).
    """
    if layer_path is not None:
        stack = model.get_submodule(layer_path)
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"{layer_path!r} is a {type(stack).__name__}, not an nn.ModuleList")
        return layer_path, stack
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        names = [name for name, _ in found] or "none"
        raise ValueError(
            f"cannot tell the block stack of {type(model).__name__} (ModuleLists with "
            f"num_hidden_layers={count} entries: {names}); pass layer_path, e.g. "
            "'bert.encoder.layer' or 'transformer.h'"
        )
    return found[0]


def every_other_layer(count: int) -> list[int]:
    """DistilBERT's choice: teacher layers 0, 2, 4, ... (one out of two)."""
    return list(range(0, count, 2))


def shallow_copy(
    teacher: nn.Module,
    layers: Sequence[int] | None = None,
    layer_path: str | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """A student of the teacher's class with the teacher's blocks ``layers`` and all else copied.

    Args:
        teacher: a Hugging Face model (left unchanged).
        layers: teacher block indices, in the student's order (``[0, 2, 4]``); default: every
            other block (:func:`every_other_layer`).
        layer_path: the block stack's path; default: found (:func:`find_layer_stack`).
        config: config values to change in the student that leave parameter shapes alone
            (e.g. ``{attention_probs_dropout_prob: 0.0}`` for attention-map losses).

    Returns:
        a new model (train mode, trainable) whose config says ``num_hidden_layers=len(layers)``;
        its parameters are copies, not shared with the teacher.

    Raises:
        ValueError: an empty layer list or an index outside the teacher's blocks.
    """
    path, stack = find_layer_stack(teacher, layer_path)
    layers = every_other_layer(len(stack)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < len(stack)]
    if not layers or bad:
        raise ValueError(
            f"layers must be a non-empty list of teacher block indices in 0..{len(stack) - 1}, "
            f"got {list(layers)}"
        )
    student_config = copy.deepcopy(teacher.config)
    for key, value in (config or {}).items():
        setattr(student_config, key, value)
    config = student_config
    config.num_hidden_layers = len(layers)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    kwargs = {}
    attn = getattr(teacher.config, "_attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    student = type(teacher)._from_config(config, **kwargs)
    source = teacher.state_dict()
    prefix = f"{path}."
    state = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            state[key] = source[f"{prefix}{layers[int(index)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict(state, strict=True)
    student.train()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


class ShallowCopy(nn.Module):
    """A DistilBERT-style student: the teacher's embeddings, head and a subset of its blocks.

    Calling ``ShallowCopy(...)`` returns the Hugging Face model itself (see :func:`shallow_copy`).
    It records a self-contained spec (its config), so the run's checkpoints do not need the
    teacher directory to be rebuilt.

    Args:
        pretrained: the teacher: a model directory (``package:<module>/<folder>`` inside an
            installed package), a cached hub name, or a kd_lightning checkpoint whose student
            is a Hugging Face model (e.g. a teacher fine-tuned with ``Supervised``).
        task: the head to load (see :class:`~kd_lightning.models.HFModel`).
        layers: teacher blocks to keep, in order; default: every other one.
        num_classes: classes or vocabulary size (linked from the data by the CLI).
        layer_path: the block stack's path; default: found.
        config: config changes that keep parameter shapes (e.g. dropout rates).
        attn_implementation: as :class:`~kd_lightning.models.HFModel`.
    """

    def __new__(  # type: ignore[misc]
        cls,
        pretrained: str,
        task: str = "sequence-classification",
        layers: list[int] | None = None,
        num_classes: int | None = None,
        layer_path: str | None = None,
        config: dict[str, Any] | None = None,
        attn_implementation: str | None = "eager",
    ) -> Any:
        if Path(resolve_path(pretrained)).is_file():
            from kd_lightning.teachers import load_student  # the teachers use the model zoo

            teacher = load_student(resolve_path(pretrained))
        else:
            teacher = HFModel(
                pretrained=pretrained,
                task=task,
                num_classes=num_classes,
                attn_implementation=attn_implementation,
            )
        student = shallow_copy(teacher, layers, layer_path, config)
        student.__dict__[SPEC_ATTRIBUTE] = hf_spec(student, task)
        return student

    def __init__(  # pragma: no cover - never called: __new__ returns another class
        self,
        pretrained: str,
        task: str = "sequence-classification",
        layers: list[int] | None = None,
        num_classes: int | None = None,
        layer_path: str | None = None,
        config: dict[str, Any] | None = None,
        attn_implementation: str | None = "eager",
    ) -> None:
        super().__init__()
