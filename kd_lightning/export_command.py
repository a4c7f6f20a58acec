"""``kd-lightning export``: a checkpoint's student to ONNX or a ``torch.export`` program.

::

    kd-lightning export --checkpoint runs/digits/student.ckpt --format onnx --output student.onnx
    kd-lightning export --checkpoint X.ckpt --format program --output student.pt2 \\
        --example-shape 1 1 8 8
    kd-lightning export --checkpoint X.ckpt --format onnx --output s.onnx \\
        --config experiments/digits/hinton_kd.yaml     # example input from the config's data

The student is rebuilt from the checkpoint alone (its recorded spec and ``student.*`` weights;
pruning masks are baked in), exported with a dynamic batch axis, then loaded back (ONNX
Runtime for ``.onnx``, ``torch.export.load`` for ``.pt2``) and compared with the rebuilt
student on two batch sizes: the largest absolute difference is printed, and above ``--atol``
the command fails. See :mod:`kd_lightning.compression.export`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

FORMATS = {"onnx": ".onnx", "program": ".pt2"}


class ExportCommandError(ValueError):
    """The checkpoint cannot be exported (the message says why and what to do)."""


def rebuild_student(checkpoint: str | Path) -> nn.Module:
    """The checkpoint's student, or an :class:`ExportCommandError` that says why not."""
    from kd_lightning.callbacks.quantization import load_compressed_student

    path = Path(checkpoint)
    if not path.is_file():
        raise ExportCommandError(f"checkpoint {str(path)!r} does not exist.")
    try:
        return load_compressed_student(path).eval()
    except ImportError as err:
        raise ExportCommandError(
            f"cannot rebuild the student of {str(path)!r}: {err}. Install/import the package "
            "that defines the student's class, or export from Python with "
            "kd_lightning.compression.export_onnx(model, ...)."
        ) from err
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ExportCommandError(
            f"cannot rebuild the student of {str(path)!r}: {err}. A kd_lightning checkpoint "
            "records the student's spec (zoo models and CLI runs do); for a model built in "
            "Python, export it with kd_lightning.compression.export_onnx(model, ...)."
        ) from err


def _example_from_config(config: str | Path) -> Tensor:
    from kd_lightning.models.spec import instantiate

    spec = yaml.safe_load(Path(config).read_text()) or {}
    data = spec.get("data")
    if not isinstance(data, dict):
        raise ExportCommandError(f"{config} has no `data:` section to take an example input from.")
    datamodule = instantiate(data)
    if not hasattr(datamodule, "example_batch"):
        raise ExportCommandError(
            f"the datamodule of {config} ({type(datamodule).__name__}) has no example_batch(); "
            "pass --example-shape."
        )
    return datamodule.example_batch()["input"]


def _example_from_student(student: nn.Module) -> Tensor | None:
    from kd_lightning.models.spec import model_spec

    spec = model_spec(student) or {}
    in_features = spec.get("init_args", {}).get("in_features")
    return torch.rand(2, int(in_features)) if isinstance(in_features, int) else None


def example_input(
    student: nn.Module,
    example_shape: Sequence[int] | None = None,
    config: str | Path | None = None,
) -> Tensor:
    """An input batch for tracing: ``--example-shape``, else ``--config``'s data, else the
    student's recorded ``in_features`` (MLP)."""
    if example_shape:
        if any(int(s) < 1 for s in example_shape):
            raise ExportCommandError(f"--example-shape needs positive sizes, got {example_shape}.")
        return torch.rand(*[int(s) for s in example_shape])
    if config is not None:
        return _example_from_config(config)
    example = _example_from_student(student)
    if example is None:
        raise ExportCommandError(
            f"cannot tell the input shape of {type(student).__name__}: pass --example-shape "
            "(batch first, e.g. 1 1 8 8) or --config <the training YAML> (its data section)."
        )
    return example


def export_checkpoint(
    checkpoint: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    *,
    example_shape: Sequence[int] | None = None,
    config: str | Path | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export a checkpoint's student and check the artefact against it.

    Args:
        checkpoint: a ``.ckpt`` written by kd_lightning (plain or pruned student).
        format: ``"onnx"`` or ``"program"`` (``torch.export``, ``.pt2``).
        output: target file; default: the checkpoint path with ``.onnx`` / ``.pt2``.
        example_shape: example input shape, batch first.
        config: a training YAML whose ``data:`` section gives the example input.
        atol: tolerance of the output-equivalence check.

    Returns:
        ``{"output", "format", "max_abs_diff", "bytes", "example_shape"}``.

    Raises:
        ExportCommandError: unknown format, missing checkpoint, a student that cannot be
            rebuilt, an unknown input shape, or outputs that differ by more than ``atol``.
    """
    from kd_lightning.compression.export import (
        ExportMismatchError,
        check_equivalence,
        export_onnx,
        export_program,
    )

    if format not in FORMATS:
        raise ExportCommandError(f"--format must be one of {sorted(FORMATS)}, got {format!r}.")
    student = rebuild_student(checkpoint)
    example = example_input(student, example_shape, config)
    output = Path(output) if output is not None else Path(checkpoint).with_suffix(FORMATS[format])
    exporter = export_onnx if format == "onnx" else export_program
    exporter(student, example, output)
    # Two batch sizes: the batch axis is exported as dynamic.
    generator = torch.Generator().manual_seed(0)
    batches = [
        example,
        torch.rand((5, *example.shape[1:]), generator=generator, dtype=example.dtype),
    ]
    try:
        diff = check_equivalence(student, output, batches, atol=atol)
    except ExportMismatchError as err:
        raise ExportCommandError(str(err)) from err
    return {
        "output": str(output),
        "format": format,
        "max_abs_diff": diff,
        "bytes": output.stat().st_size,
        "example_shape": list(example.shape),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-lightning export",
        description="Export a checkpoint's student to ONNX or a torch.export program and check "
        "that the export computes the same outputs.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by kd-lightning")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--output", help="target file (default: checkpoint path, new suffix)")
    parser.add_argument(
        "--example-shape",
        type=int,
        nargs="+",
        metavar="N",
        help="example input shape, batch first, e.g. 1 1 8 8",
    )
    parser.add_argument("--config", help="training YAML whose data section gives the input")
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="equivalence tolerance (default 1e-4)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``kd-lightning export``; exits with status 2 and a message on error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.format,
            args.output,
            example_shape=args.example_shape,
            config=args.config,
            atol=args.atol,
        )
    except ExportCommandError as err:
        parser.exit(2, f"kd-lightning export: error: {err}\n")
    print(
        f"exported {args.checkpoint} -> {result['output']} ({result['format']}, "
        f"{result['bytes']:,} bytes); max |export - student| = {result['max_abs_diff']:.3g} "
        f"(atol {args.atol:g})"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
