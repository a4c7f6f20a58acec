"""``--ckpt_path`` of ``kd-lightning``: which checkpoints a command may read, and one sentence
when a checkpoint cannot be used.

* ``validate``/``test``/``predict`` without ``--ckpt_path`` refuse (``--untrained`` evaluates
  fresh weights on purpose); a checkpoint of another method or student is refused with both
  names (Lightning would rebuild the checkpoint's model and report it as the config's).
* ``fit --ckpt_path`` resumes this config's own run: another method's checkpoint (a teacher's,
  most often) is refused naming both methods, and how to use it as the teacher instead.
* Weights that do not fit the model the config builds (``--model...hidden_sizes`` changed) give
  the first tensors of another shape with both shapes, not torch's ``state_dict`` dump.
* Every file is read with ``weights_only`` (:func:`kd_lightning.artifact.read_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from kd_lightning.artifact import read_checkpoint as read_artifact
from kd_lightning.artifact import weights_mismatch
from kd_lightning.cli_errors import CLIError
from kd_lightning.models.from_checkpoint import is_from_checkpoint_spec
from kd_lightning.models.spec import _import_class

EVALUATING = ("validate", "test", "predict")
CKPT_KEYWORDS = ("best", "last", "hpc", "registry")  # Lightning resolves these itself


def _canonical(class_path: str | None) -> str | None:
    """``module.QualName`` where the class is defined (what checkpoints record), else as given."""
    if not class_path:
        return None
    try:
        cls = _import_class(class_path)
    except (ImportError, AttributeError, ValueError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


def _student_spec(model: Any) -> dict[str, Any] | None:
    if not isinstance(model, Namespace) or not model.get("class_path"):
        return None
    try:
        method = _import_class(model["class_path"])
    except (ImportError, AttributeError, ValueError):
        return None
    # The exported student: the first of ``student_args``, or ``student_arg``.
    student_arg = (getattr(method, "student_args", None) or (None,))[0] or getattr(
        method, "student_arg", "student"
    )
    spec = (model.get("init_args") or Namespace()).get(student_arg)
    return spec.as_dict() if isinstance(spec, Namespace) else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, memory-mapped, read with ``weights_only=True`` (naming a file
    never runs code from it: one that would is refused, naming the risk)."""
    try:
        checkpoint = read_artifact(path, "--ckpt_path", mmap=True)
    except (OSError, ValueError) as err:
        fix = (
            ""
            if "Pass the .ckpt" in str(err) or "empty path" in str(err)
            else " Pass a .ckpt written by fit."
        )
        raise CLIError(f"{err}{fix}") from err
    if not isinstance(checkpoint, dict):
        raise CLIError(f"--ckpt_path {str(path)!r} is not a Lightning checkpoint (no dict).")
    return checkpoint


def _saved_method(checkpoint: dict[str, Any]) -> str | None:
    """The method that wrote ``checkpoint`` (the kd_lightning record, else LightningCLI's)."""
    record = checkpoint.get("kd_lightning")
    if isinstance(record, dict) and record.get("method"):
        return _canonical(record["method"])
    hparams = checkpoint.get("hyper_parameters")
    return _canonical(hparams.get("_class_path")) if isinstance(hparams, dict) else None


def refuse_resuming_another_method(checkpoint: dict[str, Any], model: Any, path: Path) -> None:
    """``fit --ckpt_path`` resumes a run of the config's own method: refuse another method's file.

    LightningCLI would merge the checkpoint's hyperparameters into the config, re-instantiating
    the other method ("the following arguments are required: model"). A user passing a
    teacher's checkpoint usually means to distil from it: the message says how.

    Raises:
        CLIError: naming both methods and both fixes.
    """
    config_path = model.get("class_path") if isinstance(model, Namespace) else None
    config_method, saved_method = _canonical(config_path), _saved_method(checkpoint)
    if not config_method or not saved_method or config_method == saved_method:
        return
    try:
        teacher_args = getattr(_import_class(config_method), "teacher_args", ())
    except (ImportError, AttributeError, ValueError):
        teacher_args = ()
    if "teacher" in teacher_args:
        other_use = (
            "To distil from it as the teacher, leave out --ckpt_path and set "
            f"--model.init_args.teacher.init_args.checkpoint_path={path} (teacher class_path "
            "kd_lightning.teachers.PretrainedTeacher)."
        )
    else:
        other_use = (
            "To start this config's student from that checkpoint's student, leave out "
            "--ckpt_path and build the student as {class_path: kd_lightning.models.FromCheckpoint"
            f", init_args: {{checkpoint_path: {path}}}}}."
        )
    raise CLIError(
        f"--ckpt_path {str(path)!r} is a checkpoint of another method: it was written by "
        f"{saved_method}, but this config trains {config_method}. fit --ckpt_path resumes a "
        "run from this config's own checkpoint (its run folder's checkpoints/last.ckpt). "
        + other_use
    )


def check_evaluated_checkpoint(config: Namespace) -> dict[str, Any] | None:
    """Refuse ``validate``/``test``/``predict`` runs that would evaluate the wrong weights.

    Returns:
        The checkpoint that will be evaluated (``None`` when there is no file to read).

    Raises:
        CLIError: no ``--ckpt_path`` (and neither ``--untrained`` nor a ``FromCheckpoint``
            student), a checkpoint file that does not exist, or one written by another method
            or student class than the config's.
    """
    subcommand = config.get("subcommand")
    if subcommand == "fit":  # resuming: the file is read here first, so it cannot run code
        ckpt_path = config["fit"].get("ckpt_path")
        if ckpt_path is not None and str(ckpt_path) not in CKPT_KEYWORDS:
            checkpoint = read_checkpoint(ckpt_path)
            refuse_resuming_another_method(checkpoint, config["fit"].get("model"), Path(ckpt_path))
        return None
    if subcommand not in EVALUATING:
        return None
    settings = config[subcommand]
    ckpt_path, model = settings.get("ckpt_path"), settings.get("model")
    student = _student_spec(model)
    if ckpt_path is None:
        if settings.get("untrained") or is_from_checkpoint_spec(student):
            return None
        raise CLIError(
            f"{subcommand} needs trained weights: pass --ckpt_path <the checkpoint fit wrote for "
            f"this config>. Without it {subcommand} evaluates freshly initialised weights; add "
            "--untrained to do that on purpose (a chance-level baseline)."
        )
    if str(ckpt_path) in CKPT_KEYWORDS:
        return None
    if not str(ckpt_path).strip():
        read_checkpoint(ckpt_path)  # refused as empty, naming --ckpt_path
    path = Path(ckpt_path)
    if not path.is_file():
        raise CLIError(f"--ckpt_path {str(path)!r} does not exist; pass a .ckpt written by fit.")
    checkpoint = read_checkpoint(path)
    record = checkpoint.get("kd_lightning")
    if not isinstance(record, dict):  # not written by kd_lightning: nothing recorded to compare
        return checkpoint
    config_method = _canonical(model.get("class_path") if isinstance(model, Namespace) else None)
    saved_method = _canonical(record.get("method"))
    saved_spec = record.get("student_spec")
    saved_student = (
        _canonical(saved_spec.get("class_path")) if isinstance(saved_spec, dict) else None
    )
    config_student = None
    if student is not None and not is_from_checkpoint_spec(student):
        config_student = _canonical(student.get("class_path"))
    method_differs = saved_method and config_method and saved_method != config_method
    student_differs = saved_student and config_student and saved_student != config_student
    if method_differs or student_differs:
        raise CLIError(
            f"--ckpt_path {str(path)!r} was written by {saved_method} (student "
            f"{saved_student}), but the config's model is {config_method} (student "
            f"{config_student}): {subcommand} would report that checkpoint's model as this "
            "config's. Pass the checkpoint this config's fit wrote, or the config that wrote "
            f"{path.name}."
        )
    return checkpoint


def refuse_weights_that_do_not_fit(model: Any, ckpt_path: str, err: Exception) -> None:
    """Replace torch's "Error(s) in loading state_dict" dump with one sentence: the first
    tensors of another shape (both shapes), the student the checkpoint records, and the fix.

    Raises:
        CLIError: always (chained to ``err``).
    """
    checkpoint = read_checkpoint(ckpt_path)
    saved, own, text = checkpoint.get("state_dict") or {}, model.state_dict(), str(err)
    # Shapes first; names only those torch named (frozen teachers are left out of checkpoints).
    named = {k for k in [*own, *saved] if f'"{k}"' in text}
    problems = weights_mismatch(own, saved, keys=False) or weights_mismatch(
        {k: v for k, v in own.items() if k in named or k in saved},
        {k: v for k, v in saved.items() if k in named or k in own},
    )
    problems = problems or text.splitlines()[-1].strip()
    spec = (checkpoint.get("kd_lightning") or {}).get("student_spec")
    recorded = (
        f" (it records the student {spec.get('class_path')} with {spec.get('init_args')})"
        if isinstance(spec, dict)
        else ""
    )
    raise CLIError(
        f"--ckpt_path {str(ckpt_path)!r} does not fit the model this config builds: "
        f"{problems}. The model arguments must match the checkpoint's: they are recorded in "
        f"it{recorded}. Leave out the --model options that change them, or pass the checkpoint "
        "that fit wrote with these arguments."
    ) from err
