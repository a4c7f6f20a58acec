"""Frozen teachers: a module that stays in eval mode, computes no gradients and never trains.

:class:`FrozenTeacher` wraps any ``nn.Module``; :class:`PretrainedTeacher` builds one from a
checkpoint written by this library (the student of a previous run becomes the teacher of the
next). :func:`load_student` rebuilds a checkpoint's student for inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.models.spec import instantiate

CHECKPOINT_KEY = "kd_lightning"
"""Top-level key of a checkpoint where this library stores the student's spec and metadata."""

STUDENT_PREFIX = "student."


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a dict with ``logits``, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
        "a dict with a 'logits' entry, or an object with a .logits attribute"
    )


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: eval mode forever, ``requires_grad=False``, forward without autograd.

    ``.train()`` on the wrapper (or on any parent, as Lightning does at each epoch) leaves the
    wrapped module in eval mode, so dropout stays off and BatchNorm running statistics are never
    updated.

    Args:
        module: the teacher network; its outputs must be logits (see :func:`output_logits`).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, FrozenTeacher):
            module = module.module
        self.module = module
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Whatever is asked, the subtree stays in eval mode.
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def read_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    """Load a kd_lightning checkpoint on the CPU, with errors that say what to do."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {str(path)!r} does not exist. Train the teacher first "
            "(e.g. `kd-lightning fit -c experiments/digits/teacher.yaml`) or fix checkpoint_path."
        )
    try:
        # Our checkpoints hold plain containers (specs, tensors); Lightning's own metadata needs
        # the full unpickler, so weights_only would refuse them.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(
            f"teacher checkpoint {str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
            f"{err}). Re-create it by training the teacher again."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt written "
            "by kd-lightning fit"
        )
    return checkpoint


def load_student(checkpoint_path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the student of a kd_lightning checkpoint, with its weights, in eval mode.

    Args:
        checkpoint_path: a ``.ckpt`` written by any kd_lightning method.
        model: an instance of the student's architecture, for students whose spec the checkpoint
            does not know (a model built in Python outside the zoo). Its weights are replaced.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    meta = checkpoint.get(CHECKPOINT_KEY, {})
    if model is None:
        spec = meta.get("student_spec")
        if spec is None:
            raise ValueError(
                f"{str(checkpoint_path)!r} does not record how to rebuild its student; pass "
                "model=<an instance of the student's architecture>"
            )
        model = instantiate(spec)
    state = {
        k[len(STUDENT_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(STUDENT_PREFIX)
    }
    if not state:
        raise ValueError(f"{str(checkpoint_path)!r} holds no student weights ('student.*' keys)")
    # --- pruned students (issue 7): masks are re-installed before loading ------------------
    if any(k.endswith("_mask") and f"{k[: -len('_mask')]}_orig" in state for k in state):
        from kd_lightning.compression.pruning import load_pruned_state_dict

        load_pruned_state_dict(model, state)
        return model.eval()
    # --- end pruned students --------------------------------------------------------------
    model.load_state_dict(state)
    return model.eval()


class PretrainedTeacher(FrozenTeacher):
    """A frozen teacher loaded from a checkpoint that this library wrote.

    The student of that checkpoint (``student.*`` weights, rebuilt from its recorded spec) becomes
    the teacher. The file is read at construction, so a missing or unreadable checkpoint fails at
    start-up.

    Args:
        checkpoint_path: path of the ``.ckpt`` file.
        model: the architecture, when the checkpoint does not record its spec.
    """

    def __init__(self, checkpoint_path: str, model: nn.Module | None = None) -> None:
        super().__init__(load_student(checkpoint_path, model))
        self.checkpoint_path = str(checkpoint_path)
