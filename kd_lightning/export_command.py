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

The example input comes from ``--example-shape``, else ``--config``'s data module, else the
input shape the checkpoint recorded in training (``kd_lightning_input``, written by every
``kd-lightning fit``), else an MLP's ``in_features``.

Nothing is lost: the output may not be (or resolve to) the checkpoint or the config; an
existing output is replaced only with ``--overwrite``; the export is written and checked in a
folder beside the output and moved into place only when the check passes. An ONNX file is
self-contained; a model over ONNX's 2 GB limit also needs the ``<name>.onnx.data`` file the
command names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

FORMATS = {"onnx": ".onnx", "program": ".pt2"}
INPUT_KEY = "kd_lightning_input"
"""Checkpoint key of the recorded input sample: ``{"shape": [dims without batch], "dtype"}``."""


class ExportCommandError(ValueError):
    """The checkpoint cannot be exported (the message says why and what to do)."""


def rebuild_student(checkpoint: str | Path) -> nn.Module:
    """The checkpoint's student, or an :class:`ExportCommandError` that says why not."""
    from kd_lightning.callbacks.quantization import load_compressed_student
    from kd_lightning.models.spec import UnsafeSpecError

    path = Path(checkpoint)
    if not path.is_file():
        raise ExportCommandError(f"checkpoint {str(path)!r} does not exist.")
    try:
        return load_compressed_student(path).eval()
    except UnsafeSpecError as err:
        raise ExportCommandError(f"{str(path)!r}: {err}") from err
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
    from kd_lightning.models.spec import instantiate_config

    spec = yaml.safe_load(Path(config).read_text()) or {}
    data = spec.get("data")
    if not isinstance(data, dict):
        raise ExportCommandError(f"{config} has no `data:` section to take an example input from.")
    datamodule = instantiate_config(data)  # the user's own config file
    if not hasattr(datamodule, "example_batch"):
        raise ExportCommandError(
            f"the datamodule of {config} ({type(datamodule).__name__}) has no example_batch(); "
            "pass --example-shape."
        )
    return datamodule.example_batch()["input"]


def _example_from_checkpoint(checkpoint: str | Path | None) -> Tensor | None:
    """Two random inputs of the sample shape the checkpoint recorded in training, if any."""
    if checkpoint is None:
        return None
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: the caller asks for --example-shape instead
        return None
    record = (saved.get("kd_lightning") or {}).get("input") or saved.get(INPUT_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("shape"), list):
        return None
    dtype = getattr(torch, str(record.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return None  # integer inputs (token ids) need real values, not random ones
    return torch.rand(2, *[int(s) for s in record["shape"]], dtype=dtype)


def _example_from_student(student: nn.Module) -> Tensor | None:
    from kd_lightning.models.spec import model_spec

    spec = model_spec(student) or {}
    in_features = spec.get("init_args", {}).get("in_features")
    return torch.rand(2, int(in_features)) if isinstance(in_features, int) else None


def example_input(
    student: nn.Module,
    example_shape: Sequence[int] | None = None,
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> Tensor:
    """An input batch for tracing: ``--example-shape``, else ``--config``'s data, else the
    sample shape recorded in ``checkpoint``, else the student's ``in_features`` (MLP)."""
    if example_shape:
        if any(int(s) < 1 for s in example_shape):
            raise ExportCommandError(f"--example-shape needs positive sizes, got {example_shape}.")
        return torch.rand(*[int(s) for s in example_shape])
    if config is not None:
        return _example_from_config(config)
    example = _example_from_checkpoint(checkpoint)
    if example is None:
        example = _example_from_student(student)
    if example is None:
        raise ExportCommandError(
            f"cannot tell the input shape of {type(student).__name__}: pass --example-shape "
            "(batch first, e.g. 1 1 8 8) or --config <the training YAML> (its data section)."
        )
    return example


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_path(output: Path, inputs: dict[str, Path | None], overwrite: bool) -> None:
    """Refuse an output that is (or resolves to) an input, a directory, or that exists without
    ``overwrite``."""
    if output.is_dir():
        suffix = output.suffix if output.suffix in (".onnx", ".pt2") else ".onnx"
        raise ExportCommandError(
            f"--output {str(output)!r} is a directory, not a file: --overwrite replaces a file, "
            f"never a folder. Name a file, e.g. --output {str(output / ('student' + suffix))!r}."
        )
    for flag, path in inputs.items():
        if path is not None and _same_file(output, Path(path)):
            raise ExportCommandError(
                f"--output {str(output)!r} is the {flag} file {str(path)!r}: the export would "
                "replace it. Pass another --output (default: the checkpoint path with the "
                "format's suffix)."
            )
    if output.exists() and not overwrite:
        raise ExportCommandError(
            f"{str(output)!r} exists; pass --overwrite to replace it, or another --output."
        )


def export_checkpoint(
    checkpoint: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    *,
    example_shape: Sequence[int] | None = None,
    config: str | Path | None = None,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a checkpoint's student and check the artefact against it.

    Args:
        checkpoint: a ``.ckpt`` written by kd_lightning (plain or pruned student).
        format: ``"onnx"`` or ``"program"`` (``torch.export``, ``.pt2``).
        output: target file; default: the checkpoint path with ``.onnx`` / ``.pt2``.
        example_shape: example input shape, batch first.
        config: a training YAML whose ``data:`` section gives the example input.
        atol: tolerance of the output-equivalence check.
        overwrite: replace an existing output (and its data file). Default: refuse.

    Returns:
        ``{"output", "files", "format", "max_abs_diff", "bytes", "example_shape"}``;
        ``files`` lists every file the artefact needs (the output, plus an ONNX data file
        for a model over 2 GB).

    Raises:
        ExportCommandError: unknown format, missing checkpoint, an output that aliases an
            input or exists, a student that cannot be rebuilt, an unknown input shape, or
            outputs that differ by more than ``atol``.
    """
    from kd_lightning.compression.export import (
        ExportMismatchError,
        check_equivalence,
        export_onnx,
        export_program,
    )

    if format not in FORMATS:
        raise ExportCommandError(f"--format must be one of {sorted(FORMATS)}, got {format!r}.")
    output = Path(output) if output is not None else Path(checkpoint).with_suffix(FORMATS[format])
    inputs = {"checkpoint": Path(checkpoint), "config": Path(config) if config else None}
    check_output_path(output, inputs, overwrite)
    student = rebuild_student(checkpoint)
    example = example_input(student, example_shape, config, checkpoint)
    exporter = export_onnx if format == "onnx" else export_program
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked beside the output; moved into place only once the check passed.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        exporter(student, example, staging / output.name)
        # Two batch sizes: the batch axis is exported as dynamic.
        generator = torch.Generator().manual_seed(0)
        batches = [
            example,
            torch.rand((5, *example.shape[1:]), generator=generator, dtype=example.dtype),
        ]
        try:
            diff = check_equivalence(student, staging / output.name, batches, atol=atol)
        except ExportMismatchError as err:
            raise ExportCommandError(str(err)) from err
        staged = sorted(staging.iterdir(), key=lambda f: f.name == output.name)  # output last
        for file in staged:
            check_output_path(output.parent / file.name, inputs, overwrite)
        files = []
        for file in staged:
            os.replace(file, output.parent / file.name)
            files.append(str(output.parent / file.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "output": str(output),
        "files": files[::-1],
        "format": format,
        "max_abs_diff": diff,
        "bytes": sum(Path(f).stat().st_size for f in files),
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (default: refuse)"
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
            overwrite=args.overwrite,
        )
    except ExportCommandError as err:
        parser.exit(2, f"kd-lightning export: error: {err}\n")
    needs = result["files"][1:]
    print(
        f"exported {args.checkpoint} -> {result['output']} ({result['format']}, "
        f"{result['bytes']:,} bytes); max |export - student| = {result['max_abs_diff']:.3g} "
        f"(atol {args.atol:g})"
        + (f"; keep {', '.join(needs)} beside it (external weights)" if needs else "")
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
