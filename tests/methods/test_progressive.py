"""ProgressiveDistillation: stages in one fit, frozen assistants, per-stage optimizers, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


def _chain(ckpt, stage_epochs=(2, 3), assistant_classes=10):
    torch.manual_seed(1)
    return ProgressiveDistillation(
        MLP(hidden_sizes=[8]),
        PretrainedTeacher(str(ckpt)),
        assistants=[MLP(num_classes=assistant_classes, hidden_sizes=[32])],
        stage_epochs=list(stage_epochs),
    )


class Record(Callback):
    """The stage seen by every training batch, and the optimizer's parameters per epoch."""

    def __init__(self) -> None:
        self.stages: dict[int, set[int]] = {}
        self.optimised: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.stages.setdefault(trainer.current_epoch, set()).add(module.stage)
        params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimised[trainer.current_epoch] = params


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _trainer(**kwargs):
    return fast_trainer(max_epochs=5, limit_train_batches=4, limit_val_batches=1, **kwargs)


def _data():
    return DigitsTransferSet(batch_size=32, shuffle_seed=0)


def test_stages_switch_models_and_optimizers(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    record = Record()
    trainer = _trainer(callbacks=[record])
    trainer.fit(module, _data())
    assert record.stages == {0: {0}, 1: {0}, 2: {1}, 3: {1}, 4: {1}}
    assistant = {id(p) for p in module.assistants[0].parameters()}
    student = {id(p) for p in module.student.parameters()}
    assert record.optimised[0] == assistant and record.optimised[2] == student
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    metrics = trainer.callback_metrics
    assert {"val/acc_stage1", "val/acc_stage2", "val/acc", "val/agreement"} <= set(metrics)


@pytest.mark.filterwarnings(
    # the resumed trainer deliberately has no ModelCheckpoint: nothing is saved after the resume
    "ignore:Be aware that when using `ckpt_path`:UserWarning"
)
def test_resume_mid_stage_two_continues_stage_two_and_matches(mlp_teacher_checkpoint, tmp_path):
    # Uninterrupted run.
    full = _chain(mlp_teacher_checkpoint)
    _trainer().fit(full, _data())

    # The same run, stopped after epoch 2 (the first of stage 2's three epochs)...
    interrupted = _chain(mlp_teacher_checkpoint)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(callbacks=[StopAfter(2), checkpoint], enable_checkpointing=True).fit(
        interrupted, _data()
    )
    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    assert saved["kd_lightning"]["stage"] == 1
    assert any(k.startswith("assistants.0.") for k in saved["state_dict"])
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assistant_at_stop = {k: v.clone() for k, v in interrupted.assistants[0].state_dict().items()}

    # ... and resumed in a new process-like setting: fresh modules, weights from the checkpoint.
    L.seed_everything(123, verbose=False)  # resume must not depend on the global RNG
    resumed = _chain(mlp_teacher_checkpoint)
    record = Record()
    _trainer(callbacks=[record]).fit(resumed, _data(), ckpt_path=checkpoint.last_model_path)
    assert record.stages == {3: {1}, 4: {1}}, "the resumed run must continue stage 2"
    for key, value in resumed.assistants[0].state_dict().items():
        assert torch.equal(value, assistant_at_stop[key]), "a finished assistant changed"
    for key, value in full.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key
    for key, value in full.assistants[0].state_dict().items():
        assert torch.equal(resumed.assistants[0].state_dict()[key], value), key


def test_export_is_the_final_student(mlp_teacher_checkpoint, tmp_path):
    module = _chain(mlp_teacher_checkpoint, stage_epochs=(1, 1))
    trainer = fast_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, _data())
    trainer.save_checkpoint(tmp_path / "takd.ckpt")
    x = torch.randn(3, 64)
    module.eval()
    assert torch.equal(load_student(tmp_path / "takd.ckpt")(x), module.student(x))


def test_bad_chains_fail_at_start_up(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint, assistant_classes=7)
    with pytest.raises(ValueError, match=r"assistant 0 \(assistants.0\) outputs 7 logits"):
        _trainer().fit(module, _data())
    with pytest.raises(
        ValueError, match=r"set trainer.max_epochs to 5 \(the sum of stage_epochs\)"
    ):
        fast_trainer(max_epochs=3).fit(_chain(mlp_teacher_checkpoint), _data())
    with pytest.raises(ValueError, match="stage_epochs must list 2 positive epoch counts"):
        _chain(mlp_teacher_checkpoint, stage_epochs=(2,))
    with pytest.raises(ValueError, match="stage_epochs is required"):
        ProgressiveDistillation(MLP(), None, assistants=[MLP()])
