"""Self-distillation: BYOT branches, EMA teacher, PS-KD targets, CS-KD pairs, Born-Again checks."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods.offline import BornAgain
from kd_lightning.methods.self_distillation import (
    CSKD,
    PSKD,
    BranchSelfDistillation,
    MeanTeacherDistillation,
    same_class_partners,
)
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.teachers import PretrainedTeacher
from tests.conftest import fast_trainer


# ------------------------------------------------------------------------------------- BYOT
def test_unknown_branch_fails_at_construction_with_nearest_names():
    with pytest.raises(ValueError, match=r"no layer 'stage3' \(did you mean .*'stage2'"):
        BranchSelfDistillation(SmallCNN(width=4), branches=["stage3"])
    with pytest.raises(ValueError, match="branches is empty"):
        BranchSelfDistillation(SmallCNN(width=4), branches=[])
    with pytest.raises(ValueError, match="needs feature_layer"):
        BranchSelfDistillation(SmallCNN(width=4), branches=["stage1"], hint_weight=1.0)


def test_branch_objective_and_gradient_paths():
    torch.manual_seed(0)
    module = BranchSelfDistillation(
        SmallCNN(width=4), branches=["stage1"], feature_layer="pool", alpha=0.4, hint_weight=0.5,
        temperature=2.0,
    )  # fmt: skip
    module.build_heads(torch.randn(2, 1, 8, 8))
    assert module.heads[0].feature_shape == [4, 8, 8]
    batch = {"input": torch.randn(8, 1, 8, 8), "target": torch.randint(0, 10, (8,))}
    outputs = module.forward_models(batch)
    losses = module.compute_losses(outputs, batch)
    (embedding, logits), deepest = outputs["exits"][0], outputs["student"]
    p = F.softmax(deepest.detach() / 2, -1)
    kd = (p * (p.log() - F.log_softmax(logits / 2, -1))).sum(-1).mean() * 4
    hint = (embedding - outputs["deepest_feature"]).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses["kd_branch0"], kd)
    torch.testing.assert_close(losses["hint_branch0"], hint)
    expected = losses["ce"] + 0.6 * losses["ce_branch0"] + 0.4 * kd + 0.5 * hint
    torch.testing.assert_close(losses["loss"], expected)
    # The deepest exit teaches: the branch's KL and hint do not reach the deepest layers.
    (losses["kd_branch0"] + losses["hint_branch0"]).backward()
    assert module.student.classifier.weight.grad is None
    assert all(p.grad is None for p in module.student.stage2.parameters())
    assert module.student.stage1[0].weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- EMA
def test_ema_update_rule_and_isolation():
    torch.manual_seed(0)
    module = MeanTeacherDistillation(MLP(hidden_sizes=[4]), decay=0.9)
    ema0 = [p.clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module.ema.update(module.student, 0.9)
    for e0, e, s in zip(ema0, module.ema.parameters(), module.student.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * s)
    assert all(not p.requires_grad for p in module.ema.parameters())
    module.train()
    assert not module.ema.training and not module.ema.module.training
    assert not {id(p) for p in module.ema.parameters()} & {
        id(p) for p in module.trainable_parameters()
    }
    assert any(k.startswith("ema.module.") for k in module.state_dict())


def test_ema_follows_the_ramped_decay_during_fit():
    L.seed_everything(0, verbose=False)
    module = MeanTeacherDistillation(MLP(hidden_sizes=[8]), decay=0.99)
    # After the first optimizer step, d = min(0.99, 1 - 1/2) = 0.5: ema = (init + new) / 2.
    init = [p.clone() for p in module.student.parameters()]
    trainer = fast_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, DigitsTransferSet(shuffle_seed=0))
    for p0, p, e in zip(init, module.student.parameters(), module.ema.parameters(), strict=True):
        torch.testing.assert_close(e, 0.5 * p0 + 0.5 * p)


# ------------------------------------------------------------------------------------ PS-KD
def test_pskd_targets_mix_past_predictions():
    torch.manual_seed(0)
    module = PSKD(MLP(hidden_sizes=[4]), alpha_T=0.8, num_classes=10)
    module._allocate(6, 10)
    past = F.softmax(torch.randn(6, 10), -1)
    module.past_predictions.copy_(past)
    module.has_past[:] = torch.tensor([True, True, False, True, True, True])
    module._trainer = SimpleNamespace(max_epochs=4, current_epoch=1, world_size=1)
    logits = torch.randn(4, 10)
    batch = {"index": torch.tensor([0, 2, 4, 5]), "target": torch.tensor([3, 1, -1, 7])}
    losses = module.compute_losses({"student": logits}, batch)
    alpha = 0.8 * 2 / 4  # epoch 1 of 4 (0-based): alpha_T * (t + 1) / T
    expected = []
    for row, (i, y) in enumerate([(0, 3), (2, 1), (5, 7)]):
        a = alpha if i != 2 else 0.0  # sample 2 has no stored prediction: plain one-hot
        soft = (1 - a) * F.one_hot(torch.tensor(y), 10).float() + a * past[i]
        r = row if row < 2 else 3
        expected.append(-(soft * F.log_softmax(logits[r], -1)).sum())
    torch.testing.assert_close(losses["pskd"], torch.stack(expected).mean())
    # This step's predictions are stored for the next epoch.
    torch.testing.assert_close(module.past_predictions[[0, 2, 4, 5]], F.softmax(logits, -1))
    assert module.has_past.all()
    module._trainer = None


def test_pskd_buffer_survives_the_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    module = PSKD(MLP(hidden_sizes=[8]))
    trainer = fast_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(module, DigitsTransferSet(batch_size=16, shuffle_seed=0))
    assert int(module.has_past.sum()) == 64
    trainer.save_checkpoint(tmp_path / "pskd.ckpt")
    reloaded = PSKD.load_from_checkpoint(tmp_path / "pskd.ckpt")
    assert torch.equal(reloaded.past_predictions, module.past_predictions)
    assert torch.equal(reloaded.has_past, module.has_past)


# ------------------------------------------------------------------------------------ CS-KD
def test_same_class_partners_by_hand():
    target = torch.tensor([0, 1, 0, 2, 1, -1, 0])
    partner, has = same_class_partners(target)
    assert has.tolist() == [True, True, True, False, True, False, True]
    assert partner[has].tolist() == [2, 4, 6, 1, 0]


def test_cskd_loss_by_hand():
    torch.manual_seed(0)
    module = CSKD(MLP(hidden_sizes=[4]), temperature=4.0, lambda_cls=0.5)
    logits = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([5, 5, 2, -1])
    losses = module.compute_losses({"student": logits}, {"target": target})

    def kl(p_logits, q_logits):
        p = F.softmax(p_logits.detach() / 4, -1)
        return (p * (p.log() - F.log_softmax(q_logits / 4, -1))).sum() * 16

    cls = (kl(logits[1], logits[0]) + kl(logits[0], logits[1])) / 2
    torch.testing.assert_close(losses["cls"], cls)
    torch.testing.assert_close(losses["loss"], losses["ce"] + 0.5 * cls)


# ------------------------------------------------------------------------------ Born-Again
def test_born_again_needs_the_same_architecture(mlp_teacher_checkpoint):
    module = BornAgain(MLP(hidden_sizes=[32]), PretrainedTeacher(str(mlp_teacher_checkpoint)))
    with pytest.raises(ValueError, match="teacher of the student's own architecture"):
        fast_trainer(limit_train_batches=1).fit(module, DigitsTransferSet())
