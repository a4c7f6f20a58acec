"""``kd-lightning export``: the artefact runs on its own and computes what the student computes.

The ONNX file is run here directly in ONNX Runtime (not through the library's loader) and
compared with the module that was trained; bad checkpoints fail with a message naming the fix.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from kd_lightning.callbacks import MagnitudePruning
from kd_lightning.cli import main as cli_main
from kd_lightning.compression import sparsity_of
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP, SmallCNN
from tests.conftest import fast_trainer

onnxruntime = pytest.importorskip("onnxruntime")


def _trained(tmp_path, model, name, callbacks=()):
    L.seed_everything(0)
    module = Supervised(model)
    trainer = fast_trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=list(callbacks)
    )
    trainer.fit(module, DigitsTransferSet())
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return module.eval(), path


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_onnx_export_runs_in_onnxruntime_and_matches_the_module(tmp_path, capsys):
    """A pruned student (masks in the checkpoint) exported by the command, run by ONNX Runtime."""
    module, path = _trained(
        tmp_path, MLP(10, hidden_sizes=[32]), "pruned", callbacks=[MagnitudePruning(0.8, 1)]
    )
    assert sparsity_of(module.student) == pytest.approx(0.8, abs=1e-3)
    output = tmp_path / "student.onnx"
    cli_main(["export", "--checkpoint", str(path), "--format", "onnx", "--output", str(output)])
    result = _last_json(capsys)
    assert result["max_abs_diff"] <= 1e-4 and result["example_shape"] == [2, 64]

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = DigitsTransferSet().dataset("test").inputs[:7]  # (7, 1, 8, 8): another batch size
    flat = x.flatten(1).numpy()  # the MLP was exported with its recorded (N, 64) input
    (got,) = session.run(None, {session.get_inputs()[0].name: flat})
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_program_export_of_a_cnn_with_an_example_shape(tmp_path, capsys):
    module, path = _trained(tmp_path, SmallCNN(10, width=4), "cnn")
    output = tmp_path / "cnn.pt2"
    cli_main(
        [
            "export",
            "--checkpoint",
            str(path),
            "--format",
            "program",
            "--output",
            str(output),
            "--example-shape",
            "1",
            "1",
            "8",
            "8",
        ]  # fmt: skip
    )
    assert _last_json(capsys)["max_abs_diff"] <= 1e-4
    program = torch.export.load(str(output)).module()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(program(x), module(x), atol=1e-5, rtol=1e-5)


def _expect_error(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        cli_main(["export", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_checkpoint_whose_student_cannot_be_rebuilt(tmp_path, capsys):
    _, path = _trained(tmp_path, MLP(10, hidden_sizes=[8]), "ok")
    checkpoint = torch.load(path, weights_only=False)

    no_spec = dict(checkpoint)
    no_spec.pop("kd_lightning")
    torch.save(no_spec, tmp_path / "no_spec.ckpt")
    _expect_error(
        capsys,
        ["--checkpoint", str(tmp_path / "no_spec.ckpt")],
        "does not record how to rebuild its student",
    )

    gone = dict(checkpoint)
    gone["kd_lightning"] = {
        "student_spec": {"class_path": "my_private_models.Net", "init_args": {}}
    }
    torch.save(gone, tmp_path / "gone.ckpt")
    _expect_error(
        capsys,
        ["--checkpoint", str(tmp_path / "gone.ckpt")],
        "cannot import 'my_private_models.Net'",
    )
    _expect_error(capsys, ["--checkpoint", str(tmp_path / "nope.ckpt")], "does not exist")


def test_unknown_input_shape_names_the_option(tmp_path, capsys):
    _, path = _trained(tmp_path, SmallCNN(10, width=4), "cnn")
    _expect_error(capsys, ["--checkpoint", str(path)], "pass --example-shape")


def test_onnx_file_is_self_contained(tmp_path, capsys):
    """One file: no external weights (.onnx.data) beside it, runnable from another folder."""
    module, path = _trained(tmp_path, SmallCNN(10, width=4), "cnn")
    out_dir = tmp_path / "out"
    cli_main(
        [
            "export",
            "--checkpoint",
            str(path),
            "--output",
            str(out_dir / "m.onnx"),
            "--example-shape",
            "1",
            "1",
            "8",
            "8",
        ]  # fmt: skip
    )
    result = _last_json(capsys)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]
    assert result["files"] == [str(out_dir / "m.onnx")]
    moved = tmp_path / "elsewhere" / "copy.onnx"
    moved.parent.mkdir()
    moved.write_bytes((out_dir / "m.onnx").read_bytes())
    session = onnxruntime.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 8, 8)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.abs(got - module(x).numpy()).max() <= 1e-4


def test_example_shape_from_the_recorded_input(tmp_path, capsys):
    """A CNN checkpoint written with the CLI's input recorder exports without --example-shape."""
    from kd_lightning.cli import RecordInputShape

    _, path = _trained(tmp_path, SmallCNN(10, width=4), "cnn", callbacks=[RecordInputShape()])
    assert torch.load(path, weights_only=True)["kd_lightning_input"] == {
        "shape": [1, 8, 8],
        "dtype": "float32",
    }
    cli_main(["export", "--checkpoint", str(path)])
    assert _last_json(capsys)["example_shape"] == [2, 1, 8, 8]


def test_output_never_aliases_an_input(tmp_path, capsys):
    _, path = _trained(tmp_path, MLP(10, hidden_sizes=[8]), "ok")
    before = path.read_bytes()
    aliases = [path, tmp_path / "sub" / ".." / path.name]
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    for output in [*aliases, link]:
        _expect_error(
            capsys,
            ["--checkpoint", str(path), "--output", str(output), "--overwrite"],
            "is the checkpoint file",
        )
    config = tmp_path / "c.yaml"
    config.write_text("data: {class_path: kd_lightning.data.DigitsTransferSet}\n")
    _expect_error(
        capsys,
        [
            "--checkpoint",
            str(path),
            "--config",
            str(config),
            "--output",
            str(config),
            "--overwrite",
        ],
        "is the config file",
    )
    assert path.read_bytes() == before


def test_existing_output_needs_overwrite_and_failures_leave_it_alone(tmp_path, capsys):
    _, path = _trained(tmp_path, MLP(10, hidden_sizes=[8]), "ok")
    output = tmp_path / "student.onnx"
    output.write_bytes(b"an earlier export")
    _expect_error(capsys, ["--checkpoint", str(path), "--output", str(output)], "pass --overwrite")
    assert output.read_bytes() == b"an earlier export"
    # An export that fails its check (atol < 0 cannot hold) never reaches the output.
    argv = ["--checkpoint", str(path), "--output", str(output), "--overwrite", "--atol", "-1"]
    _expect_error(capsys, argv, "differs from the eager model")
    assert output.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.ckpt", "student.onnx"]  # no leftovers
    cli_main(["export", "--checkpoint", str(path), "--output", str(output), "--overwrite"])
    assert _last_json(capsys)["max_abs_diff"] <= 1e-4
    assert output.read_bytes()[:20] != b"an earlier export"[:20]
