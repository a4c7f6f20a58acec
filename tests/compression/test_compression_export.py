"""ONNX and torch.export round trips agree with the eager model; latency has a fixed shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.compression import (
    ExportMismatchError,
    apply_masks,
    check_equivalence,
    export_onnx,
    export_program,
    global_prune_masks,
    load_exported,
    measure_latency,
    select_parameters,
)


def _small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16 * 4 * 4, 10),
    )
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.randn(32, 1, 8, 8) * 3 + 1)
    return model  # left in train mode: export must use eval mode and restore this


def test_onnx_export_runs_in_onnxruntime_and_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _small_cnn()
    path = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "sub" / "cnn.onnx")
    assert path.exists() and model.training  # mode restored
    # Dynamic batch axis: other batch sizes than the example run too.
    batches = [torch.randn(n, 1, 8, 8) for n in (1, 2, 7)]
    diff = check_equivalence(model, path, batches, atol=1e-4)
    assert diff <= 1e-4
    assert model.training
    # The tolerance check really compares numbers: a slightly perturbed reference fails.
    perturbed = _small_cnn()
    with torch.no_grad():
        perturbed[-1].bias.add_(1e-2)
    with pytest.raises(ExportMismatchError, match="differs from the eager model"):
        check_equivalence(perturbed, path, batches[1])


def test_exported_program_round_trip_matches_with_dynamic_batch(tmp_path):
    model = _small_cnn()
    # An example batch of 1 must not freeze the batch size to 1.
    path = export_program(model, torch.randn(1, 1, 8, 8), tmp_path / "cnn.pt2")
    run = load_exported(path)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run(x), expected, atol=1e-5, rtol=1e-5)
    assert check_equivalence(model, path, [x, x[:1]]) <= 1e-5


def test_pruned_model_exports_with_its_zeros(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    masks = global_prune_masks({n: p.abs() for n, p in select_parameters(model).items()}, 0.5)
    apply_masks(model, masks)
    path = export_program(model, torch.randn(4, 6), tmp_path / "pruned.pt2")
    assert check_equivalence(model, path, torch.randn(9, 6)) <= 1e-6
    weights = torch.export.load(str(path)).state_dict
    assert torch.equal(weights["0.weight"] == 0, ~masks["0.weight"])
    assert hasattr(model[0], "weight_mask")  # the live model keeps its masks


def test_missing_file_and_shape_mismatch_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_exported(tmp_path / "absent.pt2")
    path = export_program(nn.Linear(4, 3), torch.randn(2, 4), tmp_path / "lin.pt2")
    with pytest.raises(ExportMismatchError, match="output shape"):
        check_equivalence(nn.Linear(4, 2), path, torch.randn(2, 4))


def test_measure_latency_reports_consistent_positive_statistics():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).train()
    stats = measure_latency(model, torch.randn(8, 64), repeats=7, warmup=2)
    assert set(stats) == {
        "median_ms",
        "min_ms",
        "max_ms",
        "mean_ms",
        "per_sample_ms",
        "batch_size",
        "repeats",
    }
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]
    assert stats["per_sample_ms"] == pytest.approx(stats["median_ms"] / 8)
    assert stats["batch_size"] == 8 and stats["repeats"] == 7
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(model, torch.randn(8, 64), repeats=0)
