"""Compression report: every column checked against a value derived independently."""

from __future__ import annotations

import csv

import pytest
import torch

from kd_lightning.bench.compression_report import compression_report, main
from kd_lightning.callbacks import install_masks
from kd_lightning.compression import model_size_bytes
from kd_lightning.data import DigitsTransferSet
from kd_lightning.models import MLP


def _accuracy(model, data):
    test = data.dataset("test")
    with torch.no_grad():
        return (model(test.inputs).argmax(-1) == test.targets).float().mean().item()


def test_report_columns_and_files(tmp_path):
    torch.manual_seed(0)
    data = DigitsTransferSet()
    data.setup("test")
    dense = MLP(10, hidden_sizes=[64]).eval()
    pruned = MLP(10, hidden_sizes=[64]).eval()
    pruned.load_state_dict(dense.state_dict())
    mask = torch.ones(64, 64, dtype=torch.bool)
    mask[:, :48] = False  # 3/4 of the first weight
    install_masks(pruned, {"hidden.0.0.weight": mask})

    rows = compression_report(
        [("dense", dense), ("pruned", pruned), ("int8", dense, "dynamic")],
        data,
        tmp_path,
        latency_repeats=5,
        latency_warmup=1,
    )
    by_name = {r["name"]: r for r in rows}
    params = 64 * 64 + 64 + 64 * 10 + 10
    assert by_name["dense"]["params"] == params and by_name["dense"]["kind"] == "float32"
    assert by_name["pruned"]["nonzero"] == params - 64 * 48
    assert by_name["pruned"]["kind"] == "pruned"
    assert by_name["dense"]["bytes"] == model_size_bytes(dense)
    assert by_name["pruned"]["bytes"] == model_size_bytes(dense)  # dense zeros are stored
    assert by_name["pruned"]["bytes_sparse"] < by_name["pruned"]["bytes"]
    assert by_name["int8"]["kind"] == "int8" and by_name["int8"]["params"] == params
    assert by_name["int8"]["bytes"] < by_name["dense"]["bytes"] / 1.5
    assert by_name["int8"]["compression"] == pytest.approx(
        by_name["dense"]["bytes"] / by_name["int8"]["bytes"], rel=1e-3
    )
    assert by_name["dense"]["test_acc"] == pytest.approx(_accuracy(dense, data))
    assert by_name["pruned"]["test_acc"] == pytest.approx(_accuracy(pruned, data))
    assert all(r["latency_ms"] > 0 for r in rows)

    markdown = (tmp_path / "compression_report.md").read_text()
    assert markdown.count("\n| ") == 1 + 3  # header + one line per entry
    with (tmp_path / "compression_report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["dense", "pruned", "int8"]
    assert int(table[1]["nonzero"]) == params - 64 * 48
    assert (tmp_path / "compression_report.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_reads_checkpoints(tmp_path, teacher_checkpoint, capsys):
    rows = main(
        [
            "--entry",
            f"teacher={teacher_checkpoint}",
            "--entry",
            f"t8=static:{teacher_checkpoint}",
            "--output-dir",
            str(tmp_path),
            "--repeats",
            "3",
        ]  # fmt: skip
    )
    assert [r["kind"] for r in rows] == ["float32", "int8"]
    assert rows[1]["compression"] >= 3.0  # the digits CNN in int8 (see the quantization tests)
    assert abs(rows[0]["test_acc"] - rows[1]["test_acc"]) <= 0.02
    assert "| teacher | float32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--entry", "no-equals-sign"])
