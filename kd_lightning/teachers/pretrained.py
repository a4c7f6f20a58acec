"""Teachers loaded from files: this library's checkpoints, plain ``state_dict`` files, other
Lightning checkpoints and Hugging Face model directories. Every file is read without running
code from it (see :func:`kd_lightning.artifact.read_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.artifact import (
    CHECKPOINT_KEY,
    TEACHER_TRUST_HINT,
    TRUST_HINT,
    load_state_into,
    load_student,
    read_checkpoint,
    require_path,
)
from kd_lightning.models.spec import instantiate
from kd_lightning.teachers.frozen import FrozenTeacher, call_model, output_logits


def _common_prefix(keys: list[str], model_keys: set[str]) -> str | None:
    """The prefix ``p`` such that every model key is ``p + key`` in the file, if one exists."""
    for key in keys:
        for model_key in model_keys:
            if key.endswith(model_key):
                prefix = key[: -len(model_key)]
                if all(prefix + k in keys for k in model_keys):
                    return prefix
                break
    return None


def load_weights_file(
    path: str | Path,
    model: nn.Module,
    key_prefix: str | None = None,
    trust_pickled_code: bool = False,
    trust_hint: str = TRUST_HINT,
) -> nn.Module:
    """Load a plain ``state_dict`` file or another Lightning checkpoint into ``model``.

    Args:
        path: ``torch.save(model.state_dict())`` output, or a ``.ckpt`` of any LightningModule.
        model: the architecture to load into.
        key_prefix: prefix of the model's keys in the file (``"model."`` for a LightningModule
            that holds the network as ``self.model``); ``None`` finds it when the file's keys
            contain the model's keys under one common prefix.
        trust_pickled_code, trust_hint: see :func:`kd_lightning.artifact.read_checkpoint`.

    Raises:
        ValueError: no prefix fits, or the weights do not fit the architecture.
    """
    loaded = read_checkpoint(path, "teacher weights", False, trust_pickled_code, trust_hint)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{str(path)!r} holds no state_dict (a mapping of names to tensors)")
    keys = list(state)
    if key_prefix is None:
        key_prefix = _common_prefix(keys, set(model.state_dict()))
        if key_prefix is None:
            raise ValueError(
                f"the keys of {str(path)!r} (e.g. {keys[:3]}) do not contain the keys of a "
                f"{type(model).__name__} (e.g. {list(model.state_dict())[:3]}) under one prefix: "
                "check the architecture, or pass key_prefix"
            )
    picked = {k[len(key_prefix) :]: v for k, v in state.items() if k.startswith(key_prefix)}
    return load_state_into(model, picked, repr(str(path)))


def _load_hugging_face(directory: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            f"{str(directory)!r} is a Hugging Face model directory: install the extra with "
            "`pip install 'kd_lightning[hf]'` (transformers)"
        ) from err
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(directory)


class PretrainedTeacher(FrozenTeacher):
    """A frozen teacher loaded from a file, read at construction (so a bad path fails at start-up).

    What ``checkpoint_path`` may be:

    - a checkpoint written by kd_lightning: its student artifact becomes the teacher;
    - a plain ``state_dict`` file (``torch.save(model.state_dict(), path)``), with ``model``;
    - the checkpoint of your own LightningModule, with ``model`` (and ``key_prefix`` when the
      prefix of the network's keys cannot be found, e.g. ``"model."``);
    - a Hugging Face model directory (``config.json`` + weights): loaded with the class named in
      its config (``transformers`` required).

    Args:
        checkpoint_path: the file or directory.
        model: the architecture to load the weights into (an ``nn.Module`` or a
            ``class_path``/``init_args`` spec); required for files that do not record it.
        key_prefix: prefix of the model's keys in a foreign checkpoint; ``None``: found.
        trust_pickled_code: read the file with the full unpickler (``weights_only=False``), so
            it runs whatever code it holds. Off by default: a file that holds more than tensors
            and plain containers is refused. Turn it on only for a file whose origin you trust.

    Raises:
        FileNotFoundError, ValueError: see :func:`kd_lightning.artifact.read_checkpoint`.
    """

    def __init__(
        self,
        checkpoint_path: str,
        model: nn.Module | dict[str, Any] | None = None,
        key_prefix: str | None = None,
        trust_pickled_code: bool = False,
    ) -> None:
        path = require_path(
            checkpoint_path,
            f"{type(self).__name__}'s checkpoint_path "
            "(in a config: model.init_args.teacher.init_args.checkpoint_path)",
        )
        if isinstance(model, dict):
            model = instantiate(model)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"teacher directory {str(path)!r} has no config.json: give a checkpoint file "
                    "or a Hugging Face model directory"
                )
            module = _load_hugging_face(path)
        else:
            module = self._load_file(path, model, key_prefix, trust_pickled_code)
        super().__init__(module)
        self.checkpoint_path = str(checkpoint_path)

    @staticmethod
    def _load_file(
        path: Path, model: nn.Module | None, key_prefix: str | None, trusted: bool
    ) -> nn.Module:
        trust = {"trust_pickled_code": trusted, "trust_hint": TEACHER_TRUST_HINT}
        checkpoint = read_checkpoint(path, "teacher checkpoint", **trust)
        if isinstance(checkpoint, dict) and CHECKPOINT_KEY in checkpoint and key_prefix is None:
            return load_student(path, model, **trust)
        if model is None:
            raise ValueError(
                f"{str(path)!r} is a plain state_dict or a checkpoint not written by kd_lightning: "
                "pass model=<the teacher's architecture> (in YAML: model: {class_path: ..., "
                "init_args: ...}) so the weights can be loaded into it"
            )
        return load_weights_file(path, model, key_prefix, **trust)


class PermutedTeacher(FrozenTeacher):
    """A deliberately wrong teacher: any teacher with its output classes permuted.

    Output ``c`` is the wrapped teacher's logit for class ``permutation[c]``: as confident as the
    original and wrong wherever the permutation moves the class. A controlled corruption for
    robustness experiments (multi-teacher knowledge purification).

    Args:
        checkpoint_path: a checkpoint to load the teacher from (see :class:`PretrainedTeacher`).
        teacher: or the teacher module itself (give one of the two).
        permutation: the class permutation; default: a derangement (no class kept) drawn with
            ``seed``.
        seed: seed of the default permutation.
        trust_pickled_code: see :class:`PretrainedTeacher` (off: the file cannot run code).
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        teacher: nn.Module | None = None,
        permutation: list[int] | None = None,
        seed: int = 0,
        trust_pickled_code: bool = False,
    ) -> None:
        if (checkpoint_path is None) == (teacher is None):
            raise ValueError("PermutedTeacher needs exactly one of checkpoint_path and teacher")
        if teacher is None:
            require_path(checkpoint_path, "PermutedTeacher's checkpoint_path")
            teacher = PretrainedTeacher(checkpoint_path, trust_pickled_code=trust_pickled_code)
        super().__init__(teacher)
        if permutation is not None and sorted(permutation) != list(range(len(permutation))):
            raise ValueError(f"permutation must list 0..C-1 once each, got {permutation}")
        self.permutation = permutation
        self.seed = seed

    def class_permutation(self, num_classes: int) -> torch.Tensor:
        if self.permutation is not None:
            if len(self.permutation) != num_classes:
                raise ValueError(
                    f"permutation has {len(self.permutation)} entries, the teacher outputs "
                    f"{num_classes} classes"
                )
            return torch.as_tensor(self.permutation)
        generator = torch.Generator().manual_seed(self.seed)
        while True:  # a derangement: every class moves
            perm = torch.randperm(num_classes, generator=generator)
            if not (perm == torch.arange(num_classes)).any():
                return perm

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = output_logits(super().forward(*args, **kwargs))
        return logits[..., self.class_permutation(logits.shape[-1]).to(logits.device)]

    def teach(self, batch: dict[str, Any], knowledge: dict[str, Any]) -> dict[str, Any]:
        return {"logits": call_model(self, batch["input"])}
