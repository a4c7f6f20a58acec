"""The student artifact: the one self-contained record every checkpoint carries.

Every checkpoint written by a kd_lightning method has, under ``checkpoint["kd_lightning"]``:

- ``student_spec``: the ``{"class_path", "init_args"}`` recipe of the exported student (``None``
  when the student is a user's own model built in Python: then pass ``model=``);
- ``student_prefix``: the ``state_dict`` prefix of its weights (``student.``, ``peers.1.``, ...);
- ``num_classes``, ``method`` (class path of the method that trained it), and
  ``compression`` (what a loader must install before the weights fit: pruning, fake-quant).

:func:`load_student`, :class:`~kd_lightning.teachers.PretrainedTeacher` and
:class:`~kd_lightning.models.FromCheckpoint` read only that record. Every file a user names is
read with ``torch.load(weights_only=True)``: a checkpoint cannot run code when it is loaded.
The one exception is asked for by name: ``trust_pickled_code=True`` (a teacher,
:func:`load_student`) reads a file the user trusts with the full unpickler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.models.spec import instantiate

CHECKPOINT_KEY = "kd_lightning"
"""Top-level key of a checkpoint where this library stores the student artifact."""
STUDENT_PREFIX = "student."
TRUST_HINT = (
    "Only if you trust the file's origin, load it yourself with torch.load(path, "
    "weights_only=False) and pass the resulting module/state_dict in Python."
)
TEACHER_TRUST_HINT = (
    "Only if you trust the file's origin, opt in with trust_pickled_code=True "
    "(PretrainedTeacher(..., trust_pickled_code=True); in a config `trust_pickled_code: true` "
    "in the teacher's init_args, on the command line "
    "--model.init_args.teacher.init_args.trust_pickled_code=true): the file is then read with "
    "torch.load(weights_only=False) and runs whatever code it holds."
)


def read_checkpoint(
    path: str | Path,
    what: str = "checkpoint",
    mmap: bool = False,
    trust_pickled_code: bool = False,
    trust_hint: str = TRUST_HINT,
) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt`` file on the CPU without running code from it.

    Args:
        path: the file.
        what: how the error messages name the file ("teacher checkpoint", ...).
        mmap: memory-map the tensors instead of reading them (a large file only inspected).
        trust_pickled_code: read with the full unpickler (``weights_only=False``): the file
            runs whatever code it holds. Only for a file whose origin the user trusts and
            explicitly opted in for.
        trust_hint: the sentence of a refusal that names the opt-in of the caller.

    Returns:
        The loaded object (a dict for every checkpoint this library or Lightning writes).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not readable, or holds objects that ``weights_only`` loading
            refuses (a pickle that would run code): the message names the risk and the opt-in.
    """
    path = Path(path)
    if not path.is_file():
        who, fix = ("the teacher", "checkpoint_path") if "teacher" in what else ("it", "the path")
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist. Train {who} first (e.g. `kd-lightning fit -c "
            f"experiments/digits/teacher.yaml`) or fix {fix}."
        )
    try:
        trusted = trust_pickled_code  # the user's explicit opt-in, by name
        loaded = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every failure means the file is unusable as is
        text = str(err)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise ValueError(
                f"{what} {str(path)!r} holds Python objects beyond tensors and plain containers; "
                "loading it would run code from the file, so kd_lightning refuses it. " + trust_hint
            ) from None
        raise ValueError(
            f"{what} {str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
            f"{text.splitlines()[0] if text else ''}). Re-create it, or check the path."
        ) from None
    return loaded


def student_record(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """The student artifact record of a kd_lightning checkpoint (see the module docstring)."""
    record = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict):
        raise ValueError(
            f"{str(path)!r} does not record how to rebuild its student (no {CHECKPOINT_KEY!r} "
            "record: it was not written by kd_lightning); for a plain state_dict or another Lightning checkpoint use "
            "PretrainedTeacher(checkpoint_path=..., model=<the architecture>, key_prefix=...)"
        )
    return record


def student_state_dict(
    checkpoint: dict[str, Any], prefix: str, path: str | Path = "<checkpoint>"
) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` of a checkpoint's ``state_dict``, prefix removed."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} has no 'state_dict': it is not a Lightning checkpoint")
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"{str(path)!r} holds no weights under {prefix!r}")
    return picked


def load_state_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    compression: dict[str, Any] | None = None,
    module_path: str = "",
) -> nn.Module:
    """Load ``state`` into ``model`` strictly, installing pruning/fake-quant first when needed.

    Args:
        model: the architecture (a float model; pruning masks and QAT modules are installed).
        state: the weights.
        source: how errors name where the weights come from.
        compression: the checkpoint's compression record (see
            :func:`kd_lightning.compression.loading.compression_record`).
        module_path: where ``model`` sat in the checkpointed module (``"student"``).

    Returns:
        The loaded model (a new object when QAT replaced it).

    Raises:
        ValueError: the weights do not fit the architecture; the message lists a few
            missing/unexpected keys and shape clashes instead of torch's raw dump.
    """
    from kd_lightning.compression.loading import load_compressed_state_dict, prepare_for_state_dict

    prepared = prepare_for_state_dict(model, state, compression, module_path=module_path)
    own = prepared.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    if not problems:
        try:
            return load_compressed_state_dict(prepared, state, compression, module_path=module_path)
        except RuntimeError as err:  # shape clashes: torch lists every one; keep the first
            problems.append(str(err).splitlines()[-1].strip())
    raise ValueError(
        f"the weights in {source} do not fit a {type(model).__name__} ({'; '.join(problems)}): "
        "build the model with the architecture and arguments that were trained"
    )


def load_student(
    checkpoint_path: str | Path,
    model: nn.Module | None = None,
    trust_pickled_code: bool = False,
    trust_hint: str = TRUST_HINT,
) -> nn.Module:
    """Rebuild the student of a kd_lightning checkpoint, with its weights, in eval mode.

    Args:
        checkpoint_path: a ``.ckpt`` written by any kd_lightning method.
        model: an instance of the student's architecture, for students whose spec the
            checkpoint does not know (a model built in Python outside the zoo). Its weights are
            replaced.
        trust_pickled_code, trust_hint: see :func:`read_checkpoint` (off: the file cannot run
            code).

    Raises:
        FileNotFoundError, ValueError: see :func:`read_checkpoint`; a checkpoint without a
            recorded spec and no ``model``; weights that do not fit.
    """
    checkpoint = read_checkpoint(
        checkpoint_path, trust_pickled_code=trust_pickled_code, trust_hint=trust_hint
    )
    record = student_record(checkpoint, checkpoint_path)
    if model is None:
        spec = record.get("student_spec")
        if spec is None:
            raise ValueError(
                f"{str(checkpoint_path)!r} does not record how to rebuild its student (a model "
                "built in Python); pass model=<an instance of the student's architecture>"
            )
        model = instantiate(spec)
    prefix = record.get("student_prefix", STUDENT_PREFIX)
    state = student_state_dict(checkpoint, prefix, checkpoint_path)
    from kd_lightning.compression.loading import compression_record

    return load_state_into(
        model, state, repr(str(checkpoint_path)), compression_record(checkpoint),
        module_path=prefix.rstrip("."),
    ).eval()  # fmt: skip
