"""A frozen teacher stays frozen: values, BatchNorm buffers, optimizer, checkpoint, train mode."""

import torch

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher
from tests.conftest import fast_trainer


def test_teacher_unchanged_not_optimised_not_checkpointed(teacher_checkpoint, tmp_path):
    teacher = PretrainedTeacher(str(teacher_checkpoint))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before), "the test teacher must have BatchNorm buffers"
    module = OfflineDistillation(MLP(10, hidden_sizes=[16]), teacher)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = fast_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=2)
    trainer.fit(module, DigitsTransferSet(batch_size=32))

    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised and not (optimised & teacher_ids)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(
        not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items()
    )

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]


def test_train_mode_cannot_unfreeze():
    frozen = FrozenTeacher(
        torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3))
    )
    frozen.train()
    parent = torch.nn.ModuleDict({"teacher": frozen})
    parent.train(True)
    assert not any(m.training for m in frozen.modules())
    out = frozen(torch.randn(4, 3, requires_grad=True))
    assert not out.requires_grad
