"""Self-distillation: BYOT exits, EMA teacher, PS-KD targets, CS-KD pairs, Born-Again checks."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from kd_lightning.cli import build_cli
from kd_lightning.data import DigitsTransferSet
from kd_lightning.functional.self_knowledge import branch_hint, same_class_partners
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.losses.self_knowledge import PSKDLoss
from kd_lightning.methods.offline import BornAgain
from kd_lightning.methods.self_distillation import (
    CSKD,
    PSKD,
    BranchSelfDistillation,
    MeanTeacherDistillation,
)
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LinearRamp, LossTerm, Progress
from kd_lightning.teachers import PretrainedTeacher
from tests.conftest import fast_trainer


def _kl(p_logits, q_logits, t):
    p = F.softmax(p_logits.detach() / t, -1)
    return (p * (p.log() - F.log_softmax(q_logits / t, -1))).sum(-1) * t * t


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
    knowledge = module.forward_knowledge(batch, "train")
    losses = module.compute_losses(knowledge, batch, "train")
    embedding, logits = knowledge["exit0.embedding"], knowledge["exit0"]
    deepest = knowledge["student"]
    kd = _kl(deepest, logits, 2.0).mean()
    hint = (embedding - knowledge["student.pool"]).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses["kd_exit0"], kd)
    torch.testing.assert_close(losses["hint_exit0"], hint)
    expected = losses["ce"] + 0.6 * losses["ce_exit0"] + 0.4 * kd + 0.5 * hint
    torch.testing.assert_close(losses["loss"], expected)
    # The deepest exit teaches: the branch's KL and hint do not reach the deepest layers.
    (losses["kd_exit0"] + losses["hint_exit0"]).backward()
    assert module.student.classifier.weight.grad is None
    assert all(p.grad is None for p in module.student.stage2.parameters())
    assert module.student.stage1[0].weight.grad.abs().sum() > 0


def test_branch_hint_pools_a_feature_map():
    e, f = torch.randn(3, 5), torch.randn(3, 5, 4, 4)
    by_hand = (e - f.mean(dim=(2, 3))).pow(2).sum(-1).mean()
    torch.testing.assert_close(branch_hint(e, f), by_hand)


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


def test_mse_consistency_by_hand():
    module = MeanTeacherDistillation(
        MLP(hidden_sizes=[4]), consistency="mse", consistency_weight=2.0
    )
    z, v, y = torch.randn(5, 10), torch.randn(5, 10), torch.tensor([1, 2, 3, -1, 4])
    losses = module.compute_losses({"student": z, "ema": v}, {"target": y}, "train")
    mse = (z.softmax(-1) - v.softmax(-1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses["consistency"], mse)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(z[y >= 0], y[y >= 0]) + 2 * mse)


def _split_run(make, max_epochs: int, tmp_path, ckpt_path=None, accumulate: int = 2):
    L.seed_everything(0, verbose=False)
    module = make()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fast_trainer(max_epochs=max_epochs, accumulate_grad_batches=accumulate,
                           limit_train_batches=5, limit_val_batches=0, enable_checkpointing=True,
                           callbacks=[checkpoints])  # fmt: skip
    trainer.fit(module, DigitsTransferSet(batch_size=16, shuffle_seed=0), ckpt_path=ckpt_path)
    return module


def _straight_and_resumed(make, tmp_path, accumulate: int = 2):
    straight = _split_run(make, 2, tmp_path / "straight", accumulate=accumulate)
    _split_run(make, 1, tmp_path / "split", accumulate=accumulate)
    resumed = _split_run(make, 2, tmp_path / "split", tmp_path / "split" / "last.ckpt", accumulate)
    return straight, resumed


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    theirs = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(theirs[key], value), key


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_ema_resume_with_gradient_accumulation_is_exact(tmp_path):
    # 5 micro-batches, 2 per step: steps after batches 2, 4 and (epoch end) 5; the resumed run's
    # first micro-batch must not average the last step a second time.
    make = lambda: MeanTeacherDistillation(MLP(hidden_sizes=[8]), decay=0.9)  # noqa: E731
    straight, resumed = _straight_and_resumed(make, tmp_path)
    assert int(resumed.ema.last_step) == int(straight.ema.last_step) == 6
    _assert_same_state(straight.ema, resumed.ema)
    _assert_same_state(straight.student, resumed.student)


# ------------------------------------------------------------------------------------ PS-KD
def test_pskd_targets_mix_past_predictions():
    torch.manual_seed(0)
    module = PSKD(MLP(hidden_sizes=[4]), alpha_T=0.8, num_classes=10)
    module.past.allocate(6, 10)
    past = F.softmax(torch.randn(6, 10), -1)
    module.past.logits.copy_(past.log())
    module.past.seen[:] = torch.tensor([True, True, False, True, True, True])
    module._trainer = SimpleNamespace(max_epochs=4, current_epoch=1, global_step=0, world_size=1)
    logits = torch.randn(4, 10)
    batch = {"index": torch.tensor([0, 2, 4, 5]), "target": torch.tensor([3, 1, -1, 7])}
    module.train()
    knowledge = {"student": logits} | module.run_source("past", batch, {"student": logits})
    losses = module.compute_losses(knowledge, batch, "train")
    alpha = 0.8 * 2 / 4  # epoch 1 of 4 (0-based): alpha_T * (t + 1) / T
    expected = []
    for row, (i, y) in enumerate([(0, 3), (2, 1), (5, 7)]):
        a = alpha if i != 2 else 0.0  # sample 2 has no stored prediction: plain one-hot
        soft = (1 - a) * F.one_hot(torch.tensor(y), 10).float() + a * past[i]
        r = row if row < 2 else 3
        expected.append(-(soft * F.log_softmax(logits[r], -1)).sum())
    torch.testing.assert_close(losses["pskd"], torch.stack(expected).mean())
    # This step's predictions are stored for the next epoch.
    module.remember(batch["index"], logits)
    assert torch.equal(module.past.logits[[0, 2, 4, 5]], logits)
    assert module.past.seen.all()
    # Outside training no sample has a past (validation indices are not training indices):
    # the loss is the plain CE over the labeled samples.
    module.eval()
    knowledge = {"student": logits} | module.run_source("past", batch, {"student": logits})
    labeled = batch["target"] >= 0
    ce = F.cross_entropy(logits[labeled], batch["target"][labeled])
    torch.testing.assert_close(module.compute_losses(knowledge, batch, "val")["pskd"], ce)
    module._trainer = None


def test_pskd_alpha_schedule():
    loss = PSKDLoss(0.8)
    assert loss.alpha(Progress(epoch=3, max_epochs=4)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="set trainer.max_epochs, or give the loss a schedule"):
        loss.alpha(Progress(epoch=0))
    ramp = PSKDLoss(0.8, schedule=LinearRamp(0.0, 1.0))  # the paper's printed t / T
    assert ramp.alpha(Progress(epoch=1, max_epochs=4)) == pytest.approx(0.2)


def test_pskd_buffer_survives_the_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    module = PSKD(MLP(hidden_sizes=[8]))
    trainer = fast_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(module, DigitsTransferSet(batch_size=16, shuffle_seed=0))
    assert int(module.past.seen.sum()) == 64
    trainer.save_checkpoint(tmp_path / "pskd.ckpt")
    reloaded = PSKD.load_from_checkpoint(tmp_path / "pskd.ckpt")
    assert torch.equal(reloaded.past.logits, module.past.logits)
    assert torch.equal(reloaded.past.seen, module.past.seen)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_pskd_resume_is_exact(tmp_path):
    # The second epoch reads the first epoch's predictions (alpha_t > 0) from the checkpoint.
    straight, resumed = _straight_and_resumed(lambda: PSKD(MLP(hidden_sizes=[8])), tmp_path, 1)
    _assert_same_state(straight.past, resumed.past)
    _assert_same_state(straight.student, resumed.student)


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
    knowledge = {"student": logits} | module.partner_knowledge(logits, target)
    losses = module.compute_losses(knowledge, {"target": target}, "train")
    cls = (_kl(logits[1], logits[0], 4) + _kl(logits[0], logits[1], 4)) / 2
    torch.testing.assert_close(losses["cls"], cls)
    torch.testing.assert_close(losses["loss"], losses["ce"] + 0.5 * cls)
    # Samples without a partner hold their own logits: no pull, whatever the loss.
    torch.testing.assert_close(knowledge["partner"][2:], logits[2:].detach())


# ------------------------------------------------------------------------ arguments, knowledge
def test_arguments_and_terms_are_never_silently_ignored():
    terms = [LossTerm(HardLabelCrossEntropy(), name="ce")]
    with pytest.raises(ValueError, match=r"\['lambda_cls', 'temperature'\] only build the default"):
        CSKD(MLP(), loss_terms=terms, temperature=3.0, lambda_cls=1.0)
    with pytest.raises(ValueError, match=r"\['alpha_T'\] only build the default"):
        PSKD(MLP(), loss_terms=terms, alpha_T=0.5)
    # The default teacher ("logits") names a `teacher` the mean teacher does not have.
    with pytest.raises(ValueError, match=r"reads \['teacher'\].*knowledge is \['student', 'ema'\]"):
        MeanTeacherDistillation(MLP(), loss_terms=[LossTerm(SoftTargetKLLoss())])
    with pytest.raises(ValueError, match=r"student \(SmallCNN\): no layer 'exit1'"):
        BranchSelfDistillation(SmallCNN(width=4), branches=["stage1"], loss_terms=[
            LossTerm(HardLabelCrossEntropy(), student="exit1")])  # fmt: skip


# --------------------------------------------------------------- a loss from this file, YAML
class SoftCrossEntropy(nn.Module):
    """A user's loss, only in this file: H(softmax(teacher), softmax(student)), teacher detached."""

    uses_teacher = True

    def forward(self, *, student, teacher, target=None):
        p = teacher.detach().float().softmax(-1)
        return -(p * student.float().log_softmax(-1)).sum(-1).mean()


def _soft(p, q):
    return -(p.softmax(-1) * q.log_softmax(-1)).sum(-1).mean()


def _term(name, student, teacher=None, loss=None):
    loss = loss or f"{SoftCrossEntropy.__module__}.SoftCrossEntropy"
    args = {"name": name, "student": student} | ({"teacher": teacher} if teacher else {})
    return {"class_path": "kd_lightning.objective.LossTerm",
            "init_args": {"loss": {"class_path": loss}, **args}}  # fmt: skip


def _fit_yaml(tmp_path, method: str, init_args: dict, prepare=None):
    ce = _term("ce", "student", loss="kd_lightning.losses.HardLabelCrossEntropy")
    init_args["loss_terms"] = [ce, *init_args["loss_terms"]]
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": f"kd_lightning.methods.{method}", "init_args": init_args},
        "data": {"class_path": "kd_lightning.data.DigitsTransferSet",
                 "init_args": {"batch_size": 32}},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["-c", str(tmp_path / "run.yaml")], run=False)
    if prepare is not None:
        prepare(cli)
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6
    assert {"train/loss_ce", "train/loss_soft"} <= set(cli.trainer.callback_metrics)
    changed = {k for k, v in cli.model.state_dict().items() if not torch.equal(v, before[k])}
    return cli.model.eval(), changed


_MLP = {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden_sizes": [16]}}
_X, _Y = torch.randn(40, 64), torch.arange(40) % 10


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_byot_trains_with_a_loss_defined_in_this_file(tmp_path):
    cnn = {"class_path": "kd_lightning.models.SmallCNN", "init_args": {"width": 4}}
    module, changed = _fit_yaml(tmp_path, "self_distillation.BranchSelfDistillation", {
        "student": cnn, "branches": ["stage1"], "loss_terms": [_term("soft", "exit0", "student")]},
        prepare=lambda cli: cli.model.build_heads(cli.datamodule.example_batch()["input"]))  # fmt: skip
    assert any(k.startswith("heads.0.") for k in changed)
    knowledge = module.forward_knowledge({"input": _X, "target": _Y}, "val")
    losses = module.compute_losses(knowledge, {"target": _Y}, "val")
    with torch.no_grad():
        by_hand = _soft(
            module.student(_X), module.heads[0](module.student.stage1(_X.view(-1, 1, 8, 8)))[1]
        )
    torch.testing.assert_close(losses["soft"], by_hand)


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_mean_teacher_trains_with_a_loss_defined_in_this_file(tmp_path):
    module, changed = _fit_yaml(tmp_path, "self_distillation.MeanTeacherDistillation", {
        "student": _MLP, "decay": 0.5, "loss_terms": [_term("soft", "student", "ema")]})  # fmt: skip
    assert any(k.startswith("ema.module.") for k in changed) and int(module.ema.last_step) == 6
    knowledge = module.forward_knowledge({"input": _X, "target": _Y}, "val")
    losses = module.compute_losses(knowledge, {"target": _Y}, "val")
    torch.testing.assert_close(losses["soft"], _soft(module.ema(_X), module.student(_X)))


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_pskd_trains_with_a_loss_defined_in_this_file(tmp_path):
    module, changed = _fit_yaml(tmp_path, "self_knowledge.PSKD", {
        "student": _MLP, "loss_terms": [_term("soft", "student", "past")]})  # fmt: skip
    # epoch 1 sees 96 distinct samples, epoch 2 may add some
    assert "past.logits" in changed and 96 <= int(module.past.seen.sum()) <= 192
    seen = module.past.seen.nonzero().flatten()[:8]
    batch = {"input": _X[:8], "target": _Y[:8], "index": seen}
    module.train()  # in training, `past` is what the memory holds for these samples
    knowledge = module.forward_knowledge(batch, "val")
    losses = module.compute_losses(knowledge, batch, "val")
    torch.testing.assert_close(
        losses["soft"], _soft(module.past.logits[seen], module.student(_X[:8]))
    )


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_cskd_trains_with_a_loss_defined_in_this_file(tmp_path):
    module, changed = _fit_yaml(tmp_path, "self_knowledge.CSKD", {
        "student": _MLP, "loss_terms": [_term("soft", "student", "partner")]})  # fmt: skip
    assert any(k.startswith("student.") for k in changed)
    knowledge = module.forward_knowledge({"input": _X, "target": _Y}, "val")
    losses = module.compute_losses(knowledge, {"target": _Y}, "val")
    z = module.student(_X).detach()
    partner = (torch.arange(40) + 10) % 40  # labels repeat every 10 samples
    torch.testing.assert_close(losses["soft"], _soft(z[partner], z))


# ------------------------------------------------------------------------------ Born-Again
def test_born_again_needs_the_same_architecture(mlp_teacher_checkpoint):
    module = BornAgain(MLP(hidden_sizes=[32]), PretrainedTeacher(str(mlp_teacher_checkpoint)))
    with pytest.raises(ValueError, match="teacher of the student's own architecture"):
        fast_trainer(limit_train_batches=1).fit(module, DigitsTransferSet())
