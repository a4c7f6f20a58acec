"""Offline, multi-teacher, Born-Again and data-free distillation train from YAML with a loss
defined only in this file: any loss works in every paradigm, with no library edit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kd_lightning.cli import build_cli


class SquaredProbabilityGap(nn.Module):  # the whole user loss: 6 lines
    def forward(self, *, student, teacher, target=None):
        return (student.softmax(-1) - teacher.softmax(-1)).pow(2).sum(-1).mean()


USER_LOSS = f"{__name__}.SquaredProbabilityGap"
ROOT = Path(__file__).resolve().parents[2]


def _teacher(path: Path) -> dict:
    return {"class_path": "kd_lightning.teachers.PretrainedTeacher",
            "init_args": {"checkpoint_path": str(path)}}  # fmt: skip


def _model(paradigm: str, ckpt: Path) -> dict:
    term = {"class_path": "kd_lightning.objective.LossTerm",
            "init_args": {"loss": USER_LOSS, "name": "gap"}}  # fmt: skip
    small = {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden_sizes": [8]}}
    if paradigm == "offline":
        return {
            "class_path": "kd_lightning.methods.OfflineDistillation",
            "init_args": {"student": small, "teacher": _teacher(ckpt), "loss_terms": [term]},
        }
    if paradigm == "multi_teacher":
        ensemble = {
            "class_path": "kd_lightning.teachers.TeacherEnsemble",
            "init_args": {"teachers": [_teacher(ckpt), _teacher(ckpt)], "weighting": "confidence"},
        }
        return {
            "class_path": "kd_lightning.methods.OfflineDistillation",
            "init_args": {"student": small, "teacher": ensemble, "loss_terms": [term]},
        }
    if paradigm == "born_again":  # the teacher's own architecture (the conftest teacher)
        same = yaml.safe_load((ROOT / "experiments/digits/born_again.yaml").read_text())
        student = same["model"]["init_args"]["student"]
        return {
            "class_path": "kd_lightning.methods.BornAgain",
            "init_args": {"student": student, "teacher": _teacher(ckpt), "loss_terms": [term]},
        }
    config = yaml.safe_load((ROOT / "experiments/digits/data_free_deepinversion.yaml").read_text())
    model = config["model"]
    model["init_args"].update(teacher=_teacher(ckpt), num_samples=16, loss_terms=[term])
    model["init_args"].pop("temperature", None)  # builds the default objective only: refused
    model["init_args"]["synthesiser"]["init_args"].update(steps=1, batch_size=16)
    return model  # fmt: skip


@pytest.mark.parametrize("paradigm", ["offline", "multi_teacher", "born_again", "data_free"])
def test_a_loss_from_this_file_trains_every_paradigm(paradigm, teacher_checkpoint, tmp_path):
    model = _model(paradigm, teacher_checkpoint)
    data = {"class_path": "kd_lightning.data.DigitsTransferSet", "init_args": {"batch_size": 16}}
    if paradigm == "data_free":
        data = {"class_path": "kd_lightning.data.synthesised.SynthesisedTransferSet",
                "init_args": {"evaluation": data}}  # fmt: skip
    config = {
        "seed_everything": 0, "model": model, "data": data,
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["-c", str(tmp_path / "c.yaml")], run=False)
    module = cli.model
    before = [p.clone() for p in module.student.parameters()]
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert [t.name for t in module.objective] == ["gap"]
    assert any(
        not torch.equal(p, q) for p, q in zip(module.student.parameters(), before, strict=True)
    )
    # The term computes the user's equation on the student's and the teacher's outputs.
    module.eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        losses = module.compute_losses(module.forward_knowledge({"input": x, "target": y}, "val"),
                                       {"input": x, "target": y}, "val")  # fmt: skip
        teacher = module.teacher.teach({"input": x, "target": y}, {"student": module.student(x)})
        gap = module.student(x).softmax(-1) - teacher["logits"].softmax(-1)
    torch.testing.assert_close(losses["gap"], gap.pow(2).sum(-1).mean())
