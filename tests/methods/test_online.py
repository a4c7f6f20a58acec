"""MutualDistillation: the DML objective by hand, gradient isolation, exported peer, bad cohorts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kd_lightning.cli import build_cli
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


def _kl(p_logits, q_logits, t):
    p = F.softmax(p_logits / t, -1)
    return (p * (p.log() - F.log_softmax(q_logits / t, -1))).sum(-1).mean() * t * t


def test_objective_matches_hand_computation():
    torch.manual_seed(0)
    module = MutualDistillation(
        [MLP(hidden_sizes=[4]) for _ in range(3)], temperature=2.0, ensemble_teacher=True,
        ensemble_weight=0.5, mutual_weight=0.7,
    )  # fmt: skip
    z = [torch.randn(5, 10) for _ in range(3)]
    target = torch.tensor([1, 2, -1, 3, 4])
    ensemble = torch.stack(z).mean(0)
    knowledge = {f"peer{k}": z[k] for k in range(3)} | {"ensemble": ensemble}
    losses = module.compute_losses(knowledge, {"target": target}, "train")
    labeled = target >= 0
    total = 0.0
    for k in range(3):
        ce = F.cross_entropy(z[k][labeled], target[labeled])
        mutual = sum(_kl(z[j], z[k], 2.0) for j in range(3) if j != k) / 2
        ens = _kl(ensemble, z[k], 2.0)
        torch.testing.assert_close(losses[f"ce_peer{k}"], ce)
        for j in (j for j in range(3) if j != k):
            torch.testing.assert_close(losses[f"mutual_peer{k}_from_peer{j}"], _kl(z[j], z[k], 2.0))
        pairs = sum(losses[f"mutual_peer{k}_from_peer{j}"] for j in range(3) if j != k) / 2
        torch.testing.assert_close(pairs, mutual)
        torch.testing.assert_close(losses[f"ensemble_peer{k}"], ens)
        total = total + ce + 0.7 * mutual + 0.5 * ens
    torch.testing.assert_close(losses["loss"], total)


def test_each_peer_learns_only_from_its_own_terms():
    torch.manual_seed(0)
    module = MutualDistillation([MLP(hidden_sizes=[4]), MLP(hidden_sizes=[4])])
    batch = {"input": torch.randn(6, 64), "target": torch.randint(0, 10, (6,))}
    knowledge = module.forward_knowledge(batch, "train")
    with torch.no_grad():
        by_hand = (module.peers[0](batch["input"]) + module.peers[1](batch["input"])) / 2
    torch.testing.assert_close(knowledge["ensemble"], by_hand)
    assert not knowledge["ensemble"].requires_grad
    losses = module.compute_losses(knowledge, batch, "train")
    assert "ensemble_peer0" not in losses  # the ensemble term is off by default
    losses["mutual_peer0_from_peer1"].backward()
    assert all(p.grad is None for p in module.peers[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.peers[0].parameters())


def test_bad_cohorts_fail_at_construction():
    with pytest.raises(ValueError, match="at least 2 peers, got 1.*add another"):
        MutualDistillation([MLP()])
    with pytest.raises(ValueError, match="at least 2 peers, got 0"):
        MutualDistillation([])
    peer = MLP()
    with pytest.raises(ValueError, match="same module object"):
        MutualDistillation([peer, peer])
    with pytest.raises(ValueError, match="export_peer must be 'best' or a peer index in 0..1"):
        MutualDistillation([MLP(), MLP()], export_peer=2)


def test_arguments_are_never_silently_ignored():
    terms = [LossTerm(HardLabelCrossEntropy(), name="ce0", student="peer0")]
    with pytest.raises(ValueError, match=r"\['temperature'\] only build the default objective"):
        MutualDistillation([MLP(), MLP()], loss_terms=terms, temperature=3.0)
    with pytest.raises(ValueError, match="ensemble_weight is set but ensemble_teacher is not"):
        MutualDistillation([MLP(), MLP()], ensemble_weight=0.5)
    # The default sources ("logits") name a `student` that DML does not have.
    with pytest.raises(ValueError, match=r"reads \['student'\].*student: peer0, teacher: peer1"):
        MutualDistillation([MLP(), MLP()], loss_terms=[LossTerm(HardLabelCrossEntropy())])


def test_class_count_disagreement_names_the_peer():
    module = MutualDistillation([MLP(num_classes=10), MLP(num_classes=7)])
    with pytest.raises(ValueError, match=r"peer1 \(peers.1\) outputs 7 logits"):
        fast_trainer(limit_train_batches=1).fit(module, DigitsTransferSet())


class Constant(nn.Module):
    """A peer that cannot learn: constant logits (a frozen zero bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10), requires_grad=False)

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10)


def test_best_peer_is_exported_and_loads_as_student(tmp_path):
    L.seed_everything(0, verbose=False)
    module = MutualDistillation([Constant(), MLP(hidden_sizes=[16])], export_peer="best")
    trainer = fast_trainer(max_epochs=2, limit_train_batches=10, limit_val_batches=3)
    trainer.fit(module, DigitsTransferSet(shuffle_seed=0))
    metrics = trainer.callback_metrics
    assert {"val/acc_peer0", "val/acc_peer1", "val/acc_ensemble"} <= set(metrics)
    assert metrics["val/acc_peer1"] > metrics["val/acc_peer0"]
    assert module.export_index == 1 and module.student is module.peers[1]
    torch.testing.assert_close(metrics["val/acc"], metrics["val/acc_peer1"])

    path = tmp_path / "dml.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    state = saved["state_dict"]
    assert {k for k in state if k.startswith("peers.0.")} == {"peers.0.bias"}
    # The student artifact points at the exported peer's weights (no second copy).
    assert saved["kd_lightning"]["student_prefix"] == "peers.1."
    assert saved["kd_lightning"]["export_index"] == 1
    for key, value in module.peers[1].state_dict().items():
        assert torch.equal(state[f"peers.1.{key}"], value)
    x = torch.randn(4, 64)
    module.eval()
    assert torch.equal(load_student(path)(x), module(x))
    assert torch.equal(PretrainedTeacher(str(path))(x), module(x))
    reloaded = MutualDistillation.load_from_checkpoint(
        path, peers=[Constant(), MLP(hidden_sizes=[16])]
    )
    assert reloaded.export_index == 1
    assert torch.equal(reloaded.eval()(x), module(x))


class SoftCrossEntropy(nn.Module):
    """A user's loss, only in this file: H(softmax(teacher), softmax(student)), teacher detached."""

    uses_teacher = True

    def forward(self, *, student, teacher, target=None):
        p = teacher.detach().float().softmax(-1)
        return -(p * student.float().log_softmax(-1)).sum(-1).mean()


def _term(name, student, teacher=None, loss=None):
    loss = loss or f"{SoftCrossEntropy.__module__}.SoftCrossEntropy"
    args = {"name": name, "student": student} | ({"teacher": teacher} if teacher else {})
    return {"class_path": "kd_lightning.objective.LossTerm",
            "init_args": {"loss": {"class_path": loss}, **args}}  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_cohort_trains_with_a_loss_defined_in_this_file(tmp_path):
    ce = "kd_lightning.losses.HardLabelCrossEntropy"
    mlp = {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden_sizes": [8]}}
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "kd_lightning.methods.online.MutualDistillation", "init_args": {
            "peers": [mlp, mlp],
            "loss_terms": [_term("ce0", "peer0", loss=ce), _term("ce1", "peer1", loss=ce),
                           _term("soft0", "peer0", "peer1"), _term("soft1", "peer1", "ensemble")],
        }},
        "data": {"class_path": "kd_lightning.data.DigitsTransferSet",
                 "init_args": {"batch_size": 16}},
    }  # fmt: skip
    (tmp_path / "dml.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["-c", str(tmp_path / "dml.yaml")], run=False)
    module = cli.model
    before = [[p.clone() for p in peer.parameters()] for peer in module.peers]
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert {"train/loss_soft0", "train/loss_soft1", "val/acc_peer1"} <= set(
        cli.trainer.callback_metrics
    )
    for peer, old in zip(module.peers, before, strict=True):
        assert any(not torch.equal(p, q) for p, q in zip(peer.parameters(), old, strict=True))
    # The YAML terms read the knowledge they name: soft0 is H(peer1, peer0), soft1 H(ens, peer1).
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    module.eval()
    losses = module.compute_losses(
        module.forward_knowledge({"input": x, "target": y}, "val"), {"target": y}, "val"
    )
    z0, z1 = module.peers[0](x), module.peers[1](x)
    by_hand = -(z1.softmax(-1) * z0.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(losses["soft0"], by_hand)
    ens = (z0 + z1) / 2
    torch.testing.assert_close(
        losses["soft1"], -(ens.softmax(-1) * z1.log_softmax(-1)).sum(-1).mean()
    )
