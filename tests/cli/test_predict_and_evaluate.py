"""``predict`` writes a file a user can open; evaluation needs the checkpoint of this config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.data import DigitsTransferSet
from kd_lightning.teachers import load_student

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "experiments" / "digits" / "teacher.yaml"
HINTON = ROOT / "experiments" / "digits" / "hinton_kd.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def _predict(checkpoint, *extra):
    main(["predict", "-c", str(TEACHER), "--ckpt_path", str(checkpoint), *QUIET, *extra])


def test_predict_writes_probabilities_and_classes(
    teacher_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out" / "predictions.csv"
    _predict(teacher_checkpoint, f"--predictions.path={target}")
    assert f"predictions: 360 rows -> {target}" in capsys.readouterr().out

    with target.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "pred", *[f"prob_{c}" for c in range(10)]]
    table = torch.tensor([[float(v) for v in row] for row in rows[1:]], dtype=torch.float64)
    inputs = DigitsTransferSet().dataset("test").inputs
    assert table.shape == (len(inputs), 12) == (360, 12)
    index, pred, probs = table[:, 0].long(), table[:, 1].long(), table[:, 2:]
    assert torch.equal(index, torch.arange(360))  # the predict set's positions, in order
    torch.testing.assert_close(
        probs.sum(1), torch.ones(360, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert torch.equal(pred, probs.argmax(1))
    # The file holds this checkpoint's predictions: recomputed here from the student alone.
    student = load_student(teacher_checkpoint).eval()
    with torch.no_grad():
        expected = torch.softmax(student(inputs).double(), dim=1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert not list(target.parent.glob(".*partial*"))  # no temporary file left behind


def test_predict_never_replaces_a_file_unasked(teacher_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "predictions.csv"
    target.write_text("my earlier predictions\n")
    with pytest.raises(SystemExit) as info:
        _predict(teacher_checkpoint, f"--predictions.path={target}")
    assert info.value.code == 2
    assert "pass --predictions.overwrite true" in capsys.readouterr().err
    assert target.read_text() == "my earlier predictions\n"
    _predict(teacher_checkpoint, f"--predictions.path={target}", "--predictions.overwrite=true")
    assert target.read_text().startswith("index,pred,prob_0")


def test_predict_pt_format(teacher_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "predictions.pt"
    _predict(
        teacher_checkpoint, f"--predictions.path={target}", "--trainer.limit_predict_batches=2"
    )
    saved = torch.load(target, weights_only=True)
    assert saved["probs"].shape == (2 * 64, 10) and saved["pred"].shape == (128,)
    torch.testing.assert_close(saved["probs"].sum(1), torch.ones(128), atol=1e-5, rtol=0)
    assert torch.equal(saved["index"], torch.arange(128))


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_checkpoint_refuses(subcommand, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([subcommand, "-c", str(TEACHER), *QUIET])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{subcommand} needs trained weights: pass --ckpt_path" in err and "--untrained" in err
    assert not (tmp_path / "predictions.csv").exists()


def test_untrained_is_an_explicit_choice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["validate", "-c", str(TEACHER), "--untrained", *QUIET, "--trainer.limit_val_batches=1"])


def test_checkpoint_of_another_method_is_refused(teacher_checkpoint, tmp_path, monkeypatch, capsys):
    """The teacher's checkpoint given to the distillation config: both names in the message."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "test",
        "-c",
        str(HINTON),
        f"--model.init_args.teacher.init_args.checkpoint_path={teacher_checkpoint}",
        "--ckpt_path",
        str(teacher_checkpoint),
        *QUIET,
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "was written by kd_lightning.methods.supervised.Supervised (student " in err
    assert "the config's model is kd_lightning.methods.offline.OfflineDistillation" in err


def test_missing_checkpoint_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["test", "-c", str(TEACHER), "--ckpt_path", "runs/none.ckpt", *QUIET])
    assert "--ckpt_path 'runs/none.ckpt' does not exist" in capsys.readouterr().err


def test_logits_are_written_as_probabilities():
    """Rows that are not distributions are logits: softmax([0, ln 3]) = [1/4, 3/4] by hand."""
    from kd_lightning.callbacks.prediction_writer import as_probabilities

    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()], [2.0, -1.0]])
    expected = torch.tensor([[0.25, 0.75], [1 / (1 + torch.exp(torch.tensor(-3.0)).item()), 0.0]])
    expected[1, 1] = 1 - expected[1, 0]
    torch.testing.assert_close(as_probabilities(logits), expected)
    probabilities = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert torch.equal(as_probabilities(probabilities), probabilities)  # already distributions
