"""Every method: fit -> test -> predict -> checkpoint -> reload, on tiny models.

What must stay frozen is bitwise unchanged; what must train has changed; the reloaded module
and ``load_student`` reproduce the trained student's predictions exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.offline import BornAgain
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.methods.self_distillation import (
    CSKD,
    PSKD,
    BranchSelfDistillation,
    MeanTeacherDistillation,
)
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.teachers import (
    FrozenTeacher,
    PermutedTeacher,
    PretrainedTeacher,
    TeacherEnsemble,
    load_student,
)
from tests.conftest import fast_trainer


@dataclass
class Case:
    module: L.LightningModule
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    trained: dict[str, nn.Module] = field(default_factory=dict)
    not_optimised: dict[str, nn.Module] = field(default_factory=dict)


def _mlp(width: int = 16) -> MLP:
    return MLP(hidden_sizes=[width])


def supervised(ckpt) -> Case:
    m = Supervised(_mlp())
    return Case(m, trained={"model": m.student})


def offline(ckpt) -> Case:
    m = OfflineDistillation(_mlp(), PretrainedTeacher(str(ckpt)))
    return Case(m, frozen={"teacher": m.teacher}, trained={"student": m.student})


def multi_teacher(ckpt) -> Case:
    ensemble = TeacherEnsemble(
        [PretrainedTeacher(str(ckpt)), PermutedTeacher(str(ckpt))],
        weighting="confidence",
        purify="both",
        purify_entropy=0.9,
    )
    m = OfflineDistillation(_mlp(), ensemble)
    return Case(m, frozen={"teacher": m.teacher}, trained={"student": m.student})


def born_again(ckpt) -> Case:
    m = BornAgain(MLP(hidden_sizes=[64]), PretrainedTeacher(str(ckpt)), alpha=0.5)
    return Case(m, frozen={"teacher": m.teacher}, trained={"student": m.student})


def mutual(ckpt) -> Case:
    m = MutualDistillation(
        [_mlp(), _mlp(8)], ensemble_teacher=True, export_peer="best", temperature=2.0
    )
    return Case(m, trained={"peer0": m.peers[0], "peer1": m.peers[1]})


def byot(ckpt) -> Case:
    m = BranchSelfDistillation(
        SmallCNN(width=4), branches=["stage1"], feature_layer="pool", hint_weight=0.1
    )
    return Case(m, trained={"student": m.student})


def mean_teacher(ckpt) -> Case:
    m = MeanTeacherDistillation(_mlp(), decay=0.9)
    return Case(m, trained={"student": m.student, "ema": m.ema}, not_optimised={"ema": m.ema})


def pskd(ckpt) -> Case:
    m = PSKD(_mlp())
    return Case(m, trained={"student": m.student})


def cskd(ckpt) -> Case:
    m = CSKD(_mlp())
    return Case(m, trained={"student": m.student})


def progressive(ckpt) -> Case:
    m = ProgressiveDistillation(
        _mlp(8), PretrainedTeacher(str(ckpt)), assistants=[_mlp(32)], stage_epochs=[1, 1]
    )
    return Case(
        m,
        frozen={"teacher": m.teacher},
        trained={"assistant": m.assistants[0], "student": m.student},
    )


METHODS: list[Callable] = [
    supervised,
    offline,
    multi_teacher,
    born_again,
    mutual,
    byot,
    mean_teacher,
    pskd,
    cskd,
    progressive,
]


def _snapshot(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}


@pytest.mark.parametrize("make", METHODS, ids=lambda f: f.__name__)
def test_fit_test_predict_reload(make, mlp_teacher_checkpoint, tmp_path):
    L.seed_everything(0, verbose=False)
    case = make(mlp_teacher_checkpoint)
    module = case.module
    frozen_before, trained_before = _snapshot(case.frozen), _snapshot(case.trained)
    data = DigitsTransferSet(batch_size=32, shuffle_seed=0, labeled_fraction=0.5)
    trainer = fast_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, data)

    for name, state in frozen_before.items():
        for key, value in case.frozen[name].state_dict().items():
            assert torch.equal(value, state[key]), f"frozen {name}.{key} changed"
        assert all(not p.requires_grad for p in case.frozen[name].parameters())
        # (a ModuleList holding frozen teachers has no forward: its own flag does not matter)
        modes = [
            m.training for m in case.frozen[name].modules() if not isinstance(m, nn.ModuleList)
        ]
        assert not any(modes), f"{name} is in train mode"
    for name, state in trained_before.items():
        after = case.trained[name].state_dict()
        assert any(not torch.equal(after[k], v) for k, v in state.items()), f"{name} did not train"
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, frozen in {**case.frozen, **case.not_optimised}.items():
        assert not optimised & {id(p) for p in frozen.parameters()}, f"{name} is in the optimizer"

    tested = trainer.test(module, data, verbose=False)[0]
    assert 0.0 <= tested["test/acc"] <= 1.0
    probabilities = torch.cat(fast_trainer().predict(module, data))
    assert probabilities.shape == (len(data.dataset("test")), 10)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(probabilities)))

    path = tmp_path / "method.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    frozen_prefixes = tuple(
        f"{n}." for n, m in module.named_modules() if n and isinstance(m, FrozenTeacher)
    )
    assert not [k for k in state if frozen_prefixes and k.startswith(frozen_prefixes)]
    # The student artifact points at the exported student's weights (student., model., peers.k.)
    assert any(k.startswith(checkpoint["kd_lightning"]["student_prefix"]) for k in state)

    x = data.dataset("test").inputs[:16]
    module.eval()
    with torch.no_grad():
        expected = module(x)
    reloaded = type(module).load_from_checkpoint(path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
        assert torch.equal(load_student(path)(x), expected)
    again = torch.cat(fast_trainer().predict(reloaded, data))
    assert torch.equal(again, probabilities)
