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
from torch.nn.parameter import is_lazy

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


def require_path(value: str | Path | None, argument: str) -> Path:
    """``value`` as a path, refusing an empty or blank one (``Path("")`` is the current folder,
    which would be read as a directory and fail with a message about the wrong problem).

    Raises:
        ValueError: naming ``argument`` and what to give.
    """
    if value is None or not str(value).strip():
        raise ValueError(
            f"{argument} is an empty path ({'None' if value is None else repr(str(value))}): give "
            "the path of a checkpoint file (a .ckpt written by `kd-lightning fit`, e.g. "
            "runs/digits/teacher/teacher.ckpt)"
        )
    return Path(value)


def file_format(path: str | Path) -> str:
    """``"zip"`` (what ``torch.save`` writes), ``"pickle"`` (its legacy format), or words for
    anything else ("an empty file", "a text file (starts with 'model:')", "a binary file"),
    read from the first bytes without unpickling anything."""
    with open(path, "rb") as file:
        head = file.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ (torch.save's legacy format)
        return "pickle"
    if not head:
        return "an empty file (0 bytes)"
    try:
        text = head.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = "\x00"
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):  # control bytes: not text
        return "a binary file of another format"
    first = text.splitlines()[0][:30] if text else ""
    return f"a text file (it starts with {first!r}; a YAML config?)"


def _torch_reason(text: str) -> str:
    """The reason in torch's error text, without its advice (e.g. to turn weights_only off)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [
        line
        for line in lines
        if "weights_only" not in line and not line.startswith(("Please file an issue", "Check "))
    ]
    reason = kept[0] if kept else "unreadable"
    sentences = reason.split(". ")  # torch's first sentence; two when the first is a bare tag
    return (sentences[0] if len(sentences[0]) > 45 else ". ".join(sentences[:2])).rstrip(".")


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
    path = require_path(path, what)
    if not path.is_file():
        who, fix = ("the teacher", "checkpoint_path") if "teacher" in what else ("it", "the path")
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist. Train {who} first (e.g. `kd-lightning fit -c "
            f"experiments/digits/teacher.yaml`) or fix {fix}."
        )
    kind = file_format(path)
    if kind not in ("zip", "pickle"):
        raise ValueError(
            f"{what} {str(path)!r} is not a readable checkpoint: it is {kind}, not a PyTorch "
            "checkpoint (the zip archive, or older pickle, that torch.save and Lightning write). "
            "Pass the .ckpt file that "
            "fit wrote (runs/<data>/<method>/version_N/checkpoints/*.ckpt), not a config or "
            "another file."
        )
    try:
        trusted = trust_pickled_code  # the user's explicit opt-in, by name
        mmap = mmap and kind == "zip"  # memory-mapping needs the zip format: read a pickle whole
        loaded = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every failure means the file is unusable as is
        text = str(err)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise ValueError(
                f"{what} {str(path)!r} holds Python objects beyond tensors and plain containers; "
                "loading it would run code from the file, so kd_lightning refuses it. " + trust_hint
            ) from None
        what_it_is = (
            "a zip archive but not a complete PyTorch checkpoint (an interrupted write, copy or "
            "download, or another kind of archive)"
            if kind == "zip"
            else "a Python pickle but not a PyTorch checkpoint (torch.save writes one)"
        )
        raise ValueError(
            f"{what} {str(path)!r} is not a readable checkpoint: it is {what_it_is}; torch "
            f"cannot read it ({type(err).__name__}: "
            f"{_torch_reason(text)}). Re-create it with fit (or torch.save), or check the path."
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
    fix: str | None = None,
) -> nn.Module:
    """Load ``state`` into ``model`` strictly, installing pruning/fake-quant first when needed.

    Args:
        model: the architecture (a float model; pruning masks and QAT modules are installed).
        state: the weights.
        source: how errors name where the weights come from.
        compression: the checkpoint's compression record (see
            :func:`kd_lightning.compression.loading.compression_record`).
        module_path: where ``model`` sat in the checkpointed module (``"student"``).
        fix: the sentence of the error that says what to do (default: build the model with
            the architecture and arguments that were trained).

    Returns:
        The loaded model (a new object when QAT replaced it).

    Raises:
        ValueError: the weights do not fit the architecture; the message names the first
            tensors of another shape (both shapes) and missing/unexpected names
            (:func:`weights_mismatch`) instead of torch's raw dump.
    """
    from kd_lightning.compression.loading import load_compressed_state_dict, prepare_for_state_dict

    prepared = prepare_for_state_dict(model, state, compression, module_path=module_path)
    own = prepared.state_dict()
    try:
        # Loading decides what fits: some buffers take the saved shape on load (fake-quant
        # scales and zero points are (1,) until per-channel weights arrive), so shapes are only
        # compared to word the error once torch has refused.
        return load_compressed_state_dict(prepared, state, compression, module_path=module_path)
    except RuntimeError as err:
        problems = weights_mismatch(own, state) or str(err).splitlines()[-1].strip()
    raise ValueError(
        f"the weights in {source} do not fit a {type(model).__name__} ({problems}): "
        + (fix or "build the model with the architecture and arguments that were trained")
    )


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def weights_mismatch(
    own: dict[str, Any], saved: dict[str, Any], shown: int = 2, keys: bool = True
) -> str | None:
    """How the weights ``saved`` do not fit a model whose ``state_dict()`` is ``own``, in words
    (``None`` when they fit): the first parameters of another shape, with both shapes, then
    the names missing from ``saved`` and those it has in excess (``keys=False``: shapes only).

    Lazily sized parameters and buffers (still empty in ``own``) take any shape.
    """
    clashes = [
        f"{name} is {_shape(saved[name])} in the checkpoint but {_shape(value)} in the model"
        for name, value in own.items()
        if name in saved
        and not (isinstance(value, torch.Tensor) and (is_lazy(value) or value.numel() == 0))
        and _shape(saved[name]) != _shape(value)
    ]
    problems = []
    if clashes:
        more = f" ({len(clashes)} tensors differ)" if len(clashes) > shown else ""
        problems.append("; ".join(clashes[:shown]) + more)
    if keys:
        for label, names in (
            ("missing from the checkpoint", [k for k in own if k not in saved]),
            ("not in the model", [k for k in saved if k not in own]),
        ):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                problems.append(f"{label}: {', '.join(names[:3])}{more}")
    return "; ".join(problems) or None


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
    given = model is not None
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

    fix = None
    if given and record.get("student_spec"):
        spec = record["student_spec"]
        fix = (
            "the model arguments must match the checkpoint's, and it records them: "
            f"{spec.get('class_path')} with {spec.get('init_args')}; leave out model= to build "
            "the model from that record, or build it with those arguments"
        )
    return load_state_into(
        model, state, repr(str(checkpoint_path)), compression_record(checkpoint),
        module_path=prefix.rstrip("."), fix=fix,
    ).eval()  # fmt: skip
