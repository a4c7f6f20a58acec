"""MutualDistillation: the DML objective by hand, gradient isolation, exported peer, bad cohorts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.models import MLP
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
    losses = module.compute_losses({"peers": z}, {"target": target})
    ensemble = torch.stack(z).mean(0)
    labeled = target >= 0
    total = 0.0
    for k in range(3):
        ce = F.cross_entropy(z[k][labeled], target[labeled])
        mutual = sum(_kl(z[j], z[k], 2.0) for j in range(3) if j != k) / 2
        ens = _kl(ensemble, z[k], 2.0)
        torch.testing.assert_close(losses[f"ce_peer{k}"], ce)
        torch.testing.assert_close(losses[f"mutual_peer{k}"], mutual)
        torch.testing.assert_close(losses[f"ensemble_peer{k}"], ens)
        total = total + ce + 0.7 * mutual + 0.5 * ens
    torch.testing.assert_close(losses["loss"], total)


def test_each_peer_learns_only_from_its_own_terms():
    torch.manual_seed(0)
    module = MutualDistillation([MLP(hidden_sizes=[4]), MLP(hidden_sizes=[4])])
    batch = {"input": torch.randn(6, 64), "target": torch.randint(0, 10, (6,))}
    losses = module.compute_losses(module.forward_models(batch), batch)
    losses["mutual_peer0"].backward()
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


def test_class_count_disagreement_names_the_peer():
    module = MutualDistillation([MLP(num_classes=10), MLP(num_classes=7)])
    with pytest.raises(ValueError, match=r"peer 1 \(peers.1\) outputs 7 logits"):
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
    state = torch.load(path, weights_only=False)["state_dict"]
    assert {k for k in state if k.startswith("peers.0.")} == {"peers.0.bias"}
    for key, value in module.peers[1].state_dict().items():
        assert torch.equal(state[f"student.{key}"], value)
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
