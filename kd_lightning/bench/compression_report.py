"""Compression report: teacher vs distilled vs pruned vs quantized students, side by side.

For every entry (a checkpoint, an int8 file, or a module): parameters and non-zero parameters,
bytes on disk, CPU latency per sample, test accuracy. Written as ``compression_report.md``,
``compression_report.csv`` and ``compression_report.png`` (accuracy against bytes and against
latency)::

    python -m kd_lightning.bench.compression_report \\
        --entry teacher=results/digits/runs/teacher/seed0/final.ckpt \\
        --entry student=results/digits/runs/hinton_kd/seed0/final.ckpt \\
        --entry student_int8=dynamic:results/digits/runs/hinton_kd/seed0/final.ckpt \\
        --entry pruned=results/digits/runs/prune_obd_distil/seed0/final.ckpt \\
        --output-dir results/digits/compression

Definitions (what each column measures):

* **params**: entries of the weight and bias tensors of the architecture (for an int8 model,
  of its quantized weights and biases); **nonzero**: those not exactly zero (pruned weights
  are zero; an int8 weight is zero when its integer value is).
* **bytes**: ``torch.save(model.state_dict())`` of the deployable form: pruning masks baked
  into dense tensors (zeros stored), int8 weights packed. **bytes_sparse**: the same with each
  weight that is at least half zeros stored in CSR form (float32 values, int32 column
  indices and row pointers: 8 bytes per non-zero); equal to ``bytes`` when nothing is sparse.
* **latency**: per sample, batch of 1, eager PyTorch on one CPU thread, warm, median of
  repeats (:func:`~kd_lightning.compression.measure_latency`). Pruned models run dense (zeros
  are multiplied like any weight: unstructured sparsity gives no eager speed-up). Compare
  rows measured in one report, not across machines.
* **test_acc**: top-1 accuracy on the datamodule's test split.
"""

from __future__ import annotations

import argparse
import csv
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = ["compression_report", "describe_model", "format_markdown", "main"]

COLUMNS = [
    "name",
    "kind",
    "params",
    "nonzero",
    "sparsity",
    "bytes",
    "bytes_sparse",
    "compression",
    "latency_ms",
    "test_acc",
]


def _is_pruned(model: nn.Module) -> bool:
    return any(
        isinstance(h, prune.BasePruningMethod)
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
    )


def _is_quantized(model: nn.Module) -> bool:
    return any(
        type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
        for m in model.modules()
    )


def _is_fake_quantized(model: nn.Module) -> bool:
    return any("FakeQuantize" in type(m).__name__ for m in model.modules())


def _tensors(model: nn.Module) -> list[Tensor]:
    """Weights and biases as the forward pass uses them (int8 as their integer values)."""
    out: list[Tensor] = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, nn.Module):  # quantized Linear / Conv
            w = weight()
            out.append(w.int_repr() if w.is_quantized else w)
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                out.append(bias)
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("_orig") and hasattr(module, f"{name[: -len('_orig')]}_mask"):
                base = name[: -len("_orig")]
                out.append((param * getattr(module, f"{base}_mask")).detach())
            else:
                out.append(param.detach())
    return out


def _sparse_state_bytes(model: nn.Module) -> int:
    """Bytes of the state dict with every mostly-zero weight stored as CSR components."""
    state: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.ndim >= 2
            and (value == 0).float().mean() >= 0.5
        ):
            with warnings.catch_warnings():  # "sparse CSR support is in beta": only read here
                warnings.simplefilter("ignore", UserWarning)
                csr = value.detach().reshape(value.shape[0], -1).to_sparse_csr()
            # Components saved compactly (torch.save of a CSR tensor keeps oversized storages).
            value = {
                "values": csr.values().clone(),
                "col_indices": csr.col_indices().to(torch.int32),
                "crow_indices": csr.crow_indices().to(torch.int32),
                "shape": tuple(value.shape),
            }
        state[key] = value
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def describe_model(model: nn.Module) -> dict[str, Any]:
    """``kind``, ``params``, ``nonzero``, ``sparsity``, ``bytes``, ``bytes_sparse`` of a model."""
    from kd_lightning.compression import copy_with_masks_applied, model_size_bytes

    if _is_fake_quantized(model):
        kind = "fake-quant (QAT)"
    elif _is_quantized(model):
        kind = "int8"
    elif _is_pruned(model):
        kind = "pruned"
    else:
        kind = "float32"
    deployable = copy_with_masks_applied(model) if kind == "pruned" else model
    tensors = _tensors(model)
    params = sum(t.numel() for t in tensors)
    nonzero = sum(int((t != 0).sum()) for t in tensors)
    size = model_size_bytes(deployable)
    return {
        "kind": kind,
        "params": params,
        "nonzero": nonzero,
        "sparsity": round(1 - nonzero / params, 4) if params else 0.0,
        "bytes": size,
        "bytes_sparse": _sparse_state_bytes(deployable) if kind == "pruned" else size,
    }


def _resolve(entry: Any, datamodule: Any) -> tuple[str, nn.Module]:
    """``(name, model)`` from ``(name, path|module)`` or ``(name, path|module, scheme)``."""
    from kd_lightning.callbacks.quantization import load_compressed_student, quantize_student
    from kd_lightning.compression import convert_qat
    from kd_lightning.compression.quantization import is_qat_prepared

    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise ValueError(
            "an entry is (name, checkpoint path or module) or (name, path or module, "
            f"'dynamic'|'static'), got {entry!r}."
        )
    name, source = entry[0], entry[1]
    model = source if isinstance(source, nn.Module) else load_compressed_student(source)
    if len(entry) == 3:
        model = quantize_student(model, entry[2], datamodule=datamodule)
    elif is_qat_prepared(model):
        model = convert_qat(model)  # a QAT checkpoint is deployed as its int8 conversion
    return str(name), model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, datamodule: Any, batch_size: int = 256) -> float:
    from kd_lightning.teachers import output_logits

    test = datamodule.dataset("test")
    correct = 0
    for i in range(0, len(test.targets), batch_size):
        logits = output_logits(model(test.inputs[i : i + batch_size]))
        correct += int((logits.argmax(-1) == test.targets[i : i + batch_size]).sum())
    return correct / len(test.targets)


def _latency_ms(model: nn.Module, example: Tensor, repeats: int, warmup: int) -> float:
    from kd_lightning.compression import copy_with_masks_applied, measure_latency

    target = copy_with_masks_applied(model) if _is_pruned(model) else model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_latency(target, example, repeats=repeats, warmup=warmup)["per_sample_ms"]
    finally:
        torch.set_num_threads(threads)


def format_markdown(rows: list[dict[str, Any]], title: str = "Compression report") -> str:
    lines = [
        f"## {title}",
        "",
        "| model | kind | params | non-zero | sparsity | bytes | bytes (sparse) | x smaller "
        "| CPU ms/sample | test acc % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['params']:,} | {r['nonzero']:,} | "
            f"{100 * r['sparsity']:.1f}% | {r['bytes']:,} | {r['bytes_sparse']:,} | "
            f"{r['compression']:.2f} | {r['latency_ms']:.4f} | {100 * r['test_acc']:.2f} |"
        )
    lines += [
        "",
        "bytes: `torch.save(state_dict)` of the deployable model (masks baked in, int8 packed); "
        "bytes (sparse): weights that are at least half zeros stored as CSR (float32 values, "
        "int32 indices). x smaller: "
        "bytes of the first row / this row's smallest of the two. CPU ms/sample: batch of 1, "
        "1 thread, warm, median of repeats.",
    ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in [
        (axes[0], "bytes", "bytes on disk (log)"),
        (axes[1], "latency_ms", "CPU ms / sample (log)"),
    ]:
        for r in rows:
            x = min(r["bytes"], r["bytes_sparse"]) if key == "bytes" else r[key]
            ax.scatter(x, 100 * r["test_acc"], s=40)
            ax.annotate(r["name"], (x, 100 * r["test_acc"]), fontsize=8, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy %")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compression_report(
    entries: Sequence[Any],
    datamodule: Any,
    output_dir: str | Path | None,
    *,
    title: str = "Compression report",
    latency_repeats: int = 200,
    latency_warmup: int = 30,
) -> list[dict[str, Any]]:
    """Measure every entry and write the Markdown table, CSV and plot.

    Args:
        entries: ``(name, checkpoint path | int8 file | module)``, or ``(name, source,
            "dynamic" | "static")`` to post-training-quantize the source first. The first
            entry is the reference of the ``compression`` column (e.g. the teacher or the
            float student).
        datamodule: a :class:`~kd_lightning.data.TransferSetDataModule` (test split for
            accuracy, an example input for latency, calibration data for ``"static"``).
        output_dir: where to write ``compression_report.{md,csv,png}``; ``None`` writes
            nothing.
        title: heading of the table and plot.
        latency_repeats: timed calls per model.
        latency_warmup: untimed calls first.

    Returns:
        One dict per entry with the columns of :data:`COLUMNS`.
    """
    if not entries:
        raise ValueError("entries is empty: give at least one (name, checkpoint or module).")
    datamodule.setup("test")
    example = datamodule.dataset("test").inputs[:1]
    rows: list[dict[str, Any]] = []
    for entry in entries:
        name, model = _resolve(entry, datamodule)
        row = {"name": name, **describe_model(model)}
        row["latency_ms"] = _latency_ms(model, example, latency_repeats, latency_warmup)
        row["test_acc"] = _accuracy(model, datamodule)
        rows.append(row)
    reference = rows[0]["bytes"]
    for row in rows:
        row["compression"] = round(reference / min(row["bytes"], row["bytes_sparse"]), 3)
    rows = [{k: row[k] for k in COLUMNS} for row in rows]
    if output_dir is not None:
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "compression_report.md").write_text(format_markdown(rows, title))
        with (output / "compression_report.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        _plot(rows, output / "compression_report.png", title)
    return rows


def _parse_entry(text: str) -> tuple[str, ...]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(
            f"--entry expects NAME=PATH or NAME=dynamic:PATH / NAME=static:PATH, got {text!r}"
        )
    scheme, colon, path = rest.partition(":")
    if colon and scheme in ("dynamic", "static"):
        return (name, path, scheme)
    return (name, rest)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m kd_lightning.bench.compression_report",
        description="Parameters, bytes, CPU latency and accuracy of compressed students.",
    )
    parser.add_argument("--entry", action="append", type=_parse_entry, required=True,
                        help="NAME=CHECKPOINT, or NAME=dynamic:CHECKPOINT / NAME=static:CHECKPOINT "
                        "to quantize it after training; the first entry is the size reference")  # fmt: skip
    parser.add_argument("--config", help="a training YAML whose data section is the test data "
                        "(default: DigitsTransferSet())")  # fmt: skip
    parser.add_argument("--output-dir", default="results/compression")
    parser.add_argument("--title", default="Compression report")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    if args.config:
        import yaml

        from kd_lightning.models.spec import instantiate_config as instantiate  # a config: trusted

        datamodule = instantiate((yaml.safe_load(Path(args.config).read_text()) or {})["data"])
    else:
        from kd_lightning.data import DigitsTransferSet

        datamodule = DigitsTransferSet()
    rows = compression_report(
        args.entry, datamodule, args.output_dir, title=args.title, latency_repeats=args.repeats
    )
    print(format_markdown(rows, args.title))
    print(f"written: {Path(args.output_dir) / 'compression_report.md'} (.csv, .png)")
    return rows


if __name__ == "__main__":
    main()
