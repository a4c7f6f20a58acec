"""Bad input fails at start-up, before any training step, with a message that names the fix."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.cli import main
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import SoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.teachers import PretrainedTeacher
from tests.conftest import fast_trainer


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def _fit_fails(module, data, match):
    counter = CountSteps()
    with pytest.raises(ValueError, match=match):
        fast_trainer(callbacks=[counter]).fit(module, data)
    assert counter.steps == 0


def test_student_class_count_disagrees_with_data(teacher_checkpoint):
    module = OfflineDistillation(MLP(num_classes=7), PretrainedTeacher(str(teacher_checkpoint)))
    _fit_fails(
        module,
        DigitsTransferSet(),
        "student outputs 7 logits .* build the student with num_classes=10",
    )


def test_teacher_class_count_disagrees(tmp_path):
    from lightning.pytorch import Trainer

    teacher = Supervised(SmallCNN(num_classes=12, width=4), num_classes=12)
    Trainer(logger=False, max_steps=0, enable_progress_bar=False).strategy.connect(teacher)
    path = tmp_path / "t12.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in teacher.student.state_dict().items()},
            "kd_lightning": {
                "student_spec": {
                    "class_path": "kd_lightning.models.SmallCNN",
                    "init_args": {"num_classes": 12, "width": 4},
                }
            },
        },
        path,
    )
    module = OfflineDistillation(MLP(num_classes=10), PretrainedTeacher(str(path)))
    _fit_fails(module, DigitsTransferSet(), "teacher outputs 12 logits")


def test_method_num_classes_disagrees_with_data(teacher_checkpoint):
    module = OfflineDistillation(
        MLP(num_classes=10), PretrainedTeacher(str(teacher_checkpoint)), num_classes=5
    )
    _fit_fails(module, DigitsTransferSet(), "num_classes=5 but the data has 10 classes")


def test_missing_and_unreadable_teacher_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="Train the teacher first"):
        PretrainedTeacher(str(tmp_path / "nope.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        PretrainedTeacher(str(garbage))


def test_missing_checkpoint_through_the_cli(tmp_path, capsys):
    # jsonargparse reports instantiation errors as a parse error: the message must survive.
    with pytest.raises((ValueError, SystemExit)) as info:
        main(
            [
                "fit",
                "-c",
                "experiments/digits/hinton_kd.yaml",
                f"--model.init_args.teacher.init_args.checkpoint_path={tmp_path / 'missing.ckpt'}",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    text = str(info.value) + capsys.readouterr().err
    assert "missing.ckpt' does not exist. Train the teacher first" in text


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SoftTargetKLLoss(temperature=temperature)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_labeled_fraction_range(fraction):
    with pytest.raises(ValueError, match=r"labeled_fraction must be in \(0, 1\]"):
        DigitsTransferSet(labeled_fraction=fraction)


def test_omit_classes_must_exist():
    with pytest.raises(ValueError, match=r"omit_classes names \[10\].*valid classes are 0..9"):
        DigitsTransferSet(omit_classes=[3, 10])
