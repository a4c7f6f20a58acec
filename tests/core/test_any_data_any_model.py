"""Any data, any model: a user's own LightningDataModule yielding ``(x, y)`` tuples, and a
Hugging Face style model called as ``model(input_ids=..., attention_mask=...)`` on dict batches,
go through ``kd-lightning fit`` and ``kd-lightning study`` with nothing of theirs changed.

The user's code lives in ``tests/support/user_data.py`` and is named by ``class_path`` only.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.bench.study import main as study_main
from kd_lightning.cli import main as cli_main
from kd_lightning.teachers import load_student
from tests.support.user_data import token_split, vector_split

USER = "tests.support.user_data"
ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.03}}
TEACHER_KEY = "model.init_args.teacher.init_args.checkpoint_path"
KINDS = {  # data module, teacher network, student network (4 classes each)
    "tuple": (
        f"{USER}.TupleData",
        {
            "class_path": "kd_lightning.models.MLP",
            "init_args": {"num_classes": 4, "in_features": 16, "hidden_sizes": [64]},
        },
        {
            "class_path": "kd_lightning.models.MLP",
            "init_args": {"num_classes": 4, "in_features": 16, "hidden_sizes": [8]},
        },
    ),
    "dict": (
        f"{USER}.TokenData",
        {"class_path": f"{USER}.BagOfTokensClassifier", "init_args": {"dim": 32}},
        {"class_path": f"{USER}.BagOfTokensClassifier", "init_args": {"dim": 4}},
    ),
}


def _config(kind: str, role: str, teacher_checkpoint: Path | None = None) -> dict:
    """The YAML a user writes: Supervised for the teacher, OfflineDistillation for the student."""
    data, teacher, student = KINDS[kind]
    if role == "teacher":
        model = {
            "class_path": "kd_lightning.methods.Supervised",
            "init_args": {"model": teacher, "optimizer": ADAM},
        }
    else:
        pretrained = {
            "class_path": "kd_lightning.teachers.PretrainedTeacher",
            "init_args": {"checkpoint_path": str(teacher_checkpoint)},
        }
        model = {
            "class_path": "kd_lightning.methods.OfflineDistillation",
            "init_args": {
                "student": student,
                "teacher": pretrained,
                "temperature": 2.0,
                "optimizer": ADAM,
            },
        }
    trainer = {
        "max_epochs": 4,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": {"class_path": data}}


def _fit(config: dict, path: Path) -> Path:
    """``kd-lightning fit -c path``; returns the checkpoint written beside the config."""
    checkpoint = path.with_suffix(".ckpt")
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(path.parent),
                "filename": path.stem,
                "enable_version_counter": False,
            },
        }
    ]
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "-c", str(path)])
    assert checkpoint.is_file()
    return checkpoint


@torch.no_grad()
def _logits(model: torch.nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's test-split logits, called as the user's data feeds it, and the labels."""
    if kind == "tuple":
        x, y = vector_split("test")
        return model.eval()(x), y
    ids, mask, labels = token_split("test")
    return model.eval()(input_ids=ids, attention_mask=mask)["logits"], labels


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_fit_and_predict_with_user_data_and_model(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher_ckpt = _fit(_config(kind, "teacher"), tmp_path / "teacher.yaml")
    student_ckpt = _fit(_config(kind, "student", teacher_ckpt), tmp_path / "student.yaml")

    # The student artifact rebuilds the user's own class from its spec, with trained weights.
    student, teacher = load_student(student_ckpt), load_student(teacher_ckpt)
    assert type(student).__name__ == {"tuple": "MLP", "dict": "BagOfTokensClassifier"}[kind]
    logits, labels = _logits(student, kind)
    teacher_logits, _ = _logits(teacher, kind)
    # 4 balanced-ish classes: chance is about 25%; the distilled student is far above it.
    assert (logits.argmax(1) == labels).float().mean() > 0.6
    assert (logits.argmax(1) == teacher_logits.argmax(1)).float().mean() > 0.6

    # `kd-lightning predict` (the method's own path) writes what the artifact computes.
    out = tmp_path / "predictions.csv"
    cli_main(
        [
            "predict",
            "-c",
            str(tmp_path / "student.yaml"),
            "--ckpt_path",
            str(student_ckpt),
            f"--predictions.path={out}",
        ]
    )
    with out.open(newline="") as handle:
        rows = [[float(v) for v in row] for row in list(csv.reader(handle))[1:]]
    table = torch.tensor(rows, dtype=torch.float64)
    assert torch.equal(table[:, 1].long(), logits.argmax(1))
    torch.testing.assert_close(table[:, 2:].float(), logits.softmax(1), atol=1e-5, rtol=0)


def test_study_with_user_data_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = []
    for kind in KINDS:
        runs.append({"name": f"teacher_{kind}", "config": _config(kind, "teacher")})
        runs.append(
            {
                "name": f"kd_{kind}",
                "config": _config(kind, "student", Path("unset")),
                "needs": {TEACHER_KEY: f"teacher_{kind}"},
            }
        )
    study = {"name": "user-data", "seeds": [0], "output_dir": str(tmp_path / "out"), "runs": runs}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    study_main([str(tmp_path / "study.yaml"), "--epoch-lines", "0"])

    with (tmp_path / "out" / "results.csv").open(newline="") as handle:
        table = {row["run"]: row for row in csv.DictReader(handle)}
    assert sorted(table) == ["kd_dict", "kd_tuple", "teacher_dict", "teacher_tuple"]
    for kind in KINDS:
        run_dir = tmp_path / "out" / "runs" / f"kd_{kind}" / "seed0"
        logits, labels = _logits(load_student(run_dir / "final.ckpt"), kind)
        teacher_dir = tmp_path / "out" / "runs" / f"teacher_{kind}" / "seed0"
        teacher_logits, _ = _logits(load_student(teacher_dir / "final.ckpt"), kind)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        agreement = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
        assert accuracy > 0.6
        # The table's figures are recomputed here from the checkpoints and the raw split.
        row = table[f"kd_{kind}"]
        assert float(row["acc_last_mean"]) == pytest.approx(100 * accuracy, abs=0.006)
        assert float(row["agreement_mean"]) == pytest.approx(100 * agreement, abs=0.006)
